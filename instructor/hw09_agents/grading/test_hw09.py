"""Grading tests for hw09: the action parser, schema-checked dispatch and the ReAct loop against course_lib.agents on
freshly generated cases."""
import json

import pytest

from course_lib.agents import ScriptedModel, Tool, react
from course_lib.sft import ToolCallError, parse_tool_calls

# not Tool itself: course_lib.agents builds its calculator Tool at import; validate_arguments is the dispatch an answer could borrow
REFERENCES = ["course_lib.agents.react", "course_lib.agents.validate_arguments",
              "course_lib.sft.parse_tool_calls"]

NAMES = ["add", "calc", "search", "read"]
WORDS = ["so", "first", "let me", "ok", "the answer is 7", "", "hmm"]


def _call(rng, broken=False) -> str:
    name = str(rng.choice(NAMES))
    args = {str(rng.choice(["a", "b", "q"])): int(rng.integers(0, 9)) for _ in range(int(rng.integers(0, 3)))}
    body = json.dumps({"name": name, "arguments": args})
    if broken:
        kind = int(rng.integers(0, 4))
        return ["<tool_call>" + body, "<tool_call>" + body[:-1] + "</tool_call>", '<tool_call>{"name": 3}</tool_call>',
                '<tool_call>{"name": "x", "arguments": [1]}</tool_call>'][kind]
    return f"<tool_call>{body}</tool_call>"


def _turn(rng) -> str:
    parts = [str(rng.choice(WORDS))]
    for _ in range(int(rng.integers(0, 3))):
        parts.append(_call(rng, broken=rng.random() < 0.25)); parts.append(str(rng.choice(WORDS)))
    return " ".join(parts)


@pytest.mark.question("q1 parse_action", points=3)
def test_parse_action_random(student, rng):
    for _ in range(300):
        text = _turn(rng)
        got = student.parse_action(text)
        try: calls = parse_tool_calls(text)
        except ToolCallError:
            assert got[0] == "malformed", text; continue
        if "<tool_call>" not in text: assert got == ("answer", text.strip()), text
        else:
            assert got[0] == "calls" and got[2] == calls, text
            assert got[1] == " ".join(text.split("<tool_call>")[0].split()) or "<tool_call>" not in got[1], text


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["a"],
          "properties": {"a": {"type": "number"}, "n": {"type": "integer"}, "mode": {"type": "string", "enum": ["x", "y"]},
                         "flag": {"type": "boolean"}, "items": {"type": "array"}}}


def _fn(a, n=1, mode="x", flag=False, items=None):
    if n == 0: raise ZeroDivisionError("n is 0")
    return a / n if mode == "x" else {"a": a, "flag": flag}


@pytest.mark.question("q2 dispatch", points=3)
def test_dispatch_random(student, rng):
    ref = Tool(_fn, "f", "A function.", SCHEMA, timeout_s=None)
    values = [0, 1, 2, -3, 2.5, True, False, None, "x", "y", "z", [], [1], {}]
    for _ in range(400):
        keys = list(rng.choice(["a", "n", "mode", "flag", "items", "other"], size=int(rng.integers(0, 4)), replace=False))
        args = {str(k): values[int(rng.integers(0, len(values)))] for k in keys}
        want = ref.run(args)
        got = student.dispatch(_fn, SCHEMA, args)
        assert isinstance(got, str), args
        if want.startswith("error:"): assert got.startswith("error:"), (args, want, got)
        else: assert got == want, (args, want, got)
    assert student.dispatch(_fn, SCHEMA, [1]).startswith("error:")


def _script(rng) -> list[str]:
    out = []
    for _ in range(int(rng.integers(1, 8))):
        r = rng.random()
        if r < 0.45: out.append(f'<tool_call>{{"name": "f", "arguments": {{"a": {int(rng.integers(0, 9))}, "n": {int(rng.integers(0, 3))}}}}}</tool_call>')
        elif r < 0.7: out.append("<tool_call>{broken</tool_call>")
        elif r < 0.8: out.append('<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
        else: out.append(f"answer {int(rng.integers(0, 99))}")
    return out


@pytest.mark.question("q3 react_loop", points=4)
def test_react_loop_random(student, rng):
    tool = Tool(_fn, "f", "A function.", SCHEMA, timeout_s=None)
    for _ in range(150):
        script = _script(rng) + ["final"]
        steps, bad = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        want = react(ScriptedModel(list(script)), [tool], "q", max_steps=steps, max_malformed=bad)
        sent = []
        it = iter(script)
        def chat(messages):
            sent.append([dict(m) for m in messages]); return next(it)
        answer, stop, turns = student.react_loop(chat, "f", _fn, SCHEMA, "q", max_steps=steps, max_malformed=bad)
        assert (stop, turns) == (want.stop, want.model_calls), (script, steps, bad)
        assert len(sent) == turns
        if stop == "answer": assert answer == want.answer
        # the tool observations fed back before the last turn are the reference's (errors compared by their 'error:' prefix)
        fed = [m["content"] for m in sent[-1] if m["role"] == "tool"]
        ref = [m["content"] for m in [s for s in want.steps if s.kind == "model"][-1].prompt if m["role"] == "tool"]
        assert [("error:" if o.startswith("error:") else o) for o in fed] == [("error:" if o.startswith("error:") else o) for o in ref], script
