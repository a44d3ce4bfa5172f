"""Chapter 9's plan-and-reflect loop on scripted back ends: cases where seeing the failure must change the outcome, the
check on the answer, the round limit, and ReWOO's workers skipping steps that need failed evidence."""
import pytest

from course_lib.agent_systems import plan_and_reflect
from course_lib.agents import ScriptedModel, calculator, rewoo, tool

Q = "Three boxes of 12 eggs and 5 more eggs: how many eggs?"
BAD = '#E1 = calculator[{"expression": "3 x 12"}]\n#E2 = calculator[{"expression": "#E1 + 5"}]'
GOOD = '#E1 = calculator[{"expression": "3 * 12"}]\n#E2 = calculator[{"expression": "#E1 + 5"}]'


def policy(messages):
    "A planner that writes `x` for times unless it is shown that `x` failed; a solver that repeats the last evidence."
    prompt = messages[-1]["content"]
    if prompt.startswith("Answer the question using the plan"): return prompt.rsplit("Evidence: ", 1)[1].split("\n")[0]
    return GOOD if "not an arithmetic expression: '3 x 12'" in prompt else BAD


def test_reflection_turns_a_failed_plan_into_the_right_answer():
    once = rewoo(ScriptedModel([policy], repeat_last=True), [calculator], Q)
    assert once.answer.startswith("error: skipped: #E2 needs #E1")                     # ReWOO cannot change course
    t = plan_and_reflect(ScriptedModel([policy], repeat_last=True), [calculator], Q)
    assert (t.answer, t.stop, t.model_calls) == ("41", "answer", 3)
    assert t.lines() == [
        "plan: " + BAD,
        "tool calculator({\"expression\": \"3 x 12\"}) -> error: calculator raised ValueError: not an arithmetic expression: '3 x 12'",
        'tool calculator({"expression": "#E1 + 5"}) -> error: skipped: #E2 needs #E1, which failed',
        "error: reflect: #E1 failed: error: calculator raised ValueError: not an arithmetic expression: '3 x 12'; "
        "#E2 failed: error: skipped: #E2 needs #E1, which failed",
        "plan: " + GOOD, 'tool calculator({"expression": "3 * 12"}) -> 36', 'tool calculator({"expression": "36 + 5"}) -> 41',
        "model: 41", "stop: answer"]
    shown = t.steps[4].prompt[0]["content"]   # what the reflecting planner read: the failure, the plan with evidence, the tools, the question
    assert shown.startswith("Your plan for the question was run, and it failed:\n#E1 failed:")
    assert '#E1 = calculator[{"expression": "3 x 12"}]\nEvidence: error:' in shown and "calculator: Evaluate" in shown and shown.endswith(Q)


def test_a_rejected_answer_is_a_failure_too():
    short = '#E1 = calculator[{"expression": "3 * 12"}]'
    def planner(messages):
        prompt = messages[-1]["content"]
        if prompt.startswith("Answer the question using the plan"): return prompt.rsplit("Evidence: ", 1)[1].split("\n")[0]
        return GOOD if "loose eggs" in prompt else short
    check = lambda a: None if a == "41" else "count the 5 loose eggs too"
    assert rewoo(ScriptedModel([planner], repeat_last=True), [calculator], Q).answer == "36"
    t = plan_and_reflect(ScriptedModel([planner], repeat_last=True), [calculator], Q, check=check)
    assert (t.answer, t.stop, t.model_calls, len(t.tool_calls)) == ("41", "answer", 4, 3)
    assert t.steps[3].text == "reflect: the answer '36' was rejected: count the 5 loose eggs too"
    assert plan_and_reflect(ScriptedModel([planner], repeat_last=True), [calculator], Q, check=lambda a: None).answer == "36"


@pytest.mark.parametrize("rounds", [1, 2, 4])
def test_rounds_are_bounded_and_the_trace_says_so(rounds):
    t = plan_and_reflect(ScriptedModel([BAD, "no idea"], repeat_last=False) if rounds == 1 else ScriptedModel([BAD], repeat_last=True),
                         [calculator], Q, max_rounds=rounds)
    assert t.stop == "reflect_limit" and t.model_calls == rounds + 1          # each round's plan, then the solver on the last evidence
    assert sum(s.text.startswith("reflect:") for s in t.steps) == rounds and len(t.tool_calls) == 2 * rounds


def test_an_unreadable_plan_and_a_tool_that_raises():
    t = plan_and_reflect(ScriptedModel(["I will just guess", "still guessing"]), [calculator], Q, max_plans=2)
    assert t.stop == "plan_failed" and t.answer.startswith("stopped: no readable plan in 2 attempts") and t.tool_calls == []

    @tool
    def stock(item: str) -> int:
        "Eggs in stock."
        if item != "eggs": raise KeyError(f"unknown item {item}")
        return 41
    plans = ['#E1 = stock[{"item": "egg"}]', '#E1 = stock[{"item": "eggs"}]', "41"]
    t = plan_and_reflect(ScriptedModel(plans), [stock], "How many eggs are in stock?")
    assert (t.answer, t.stop) == ("41", "answer") and t.steps[1].text == "error: stock raised KeyError: 'unknown item egg'"
