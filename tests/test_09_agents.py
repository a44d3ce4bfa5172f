"""Chapter 9: tool schemas against hand-written ones, argument checks against jsonschema, ReAct/ReWOO traces driven by
scripted back ends, the course model directly and behind chapter 7's server, and hostile code through the interpreter tool."""
import json
import os
import random
import socket
import threading
import time
import uuid
from typing import Literal

import jsonschema
import pytest

from course_lib.agent_systems import (agent_success, calculator_policy, held_out_arithmetic, mcp_server, mcp_tools, mind_search,
                                      parse_graph, tool_use_success)
from course_lib.agents import (BM25, CourseModel, OpenAIChat, PythonInterpreter, ScriptedModel, ToolArgumentError, calculator,
                               file_reader, function_schema, parse_plan, react, rewoo, tool, validate_arguments)
from course_lib.sandbox import SandboxLimits, isolation
from tiny import tiny_chat_model


def call(name, **arguments) -> str: return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


# -- schemas and validation
def f_plain(x: int, y: float = 1.5, flag: bool = False) -> str:
    "Plain types."
def f_enum(mode: Literal["fast", "slow"], tags: list[int] | None = None, extra: dict = None) -> str:
    "Enum and containers.\n\nDetails the model does not see."
def f_doc(query: str,   # what to look for
          k: int = 3,   # how many
          ) -> str:
    "Documented."

HAND = {
    "f_plain": {"name": "f_plain", "description": "Plain types.", "parameters": {"type": "object", "additionalProperties": False,
                "required": ["x"], "properties": {"x": {"type": "integer"}, "y": {"type": "number", "default": 1.5},
                                                  "flag": {"type": "boolean", "default": False}}}},
    "f_enum": {"name": "f_enum", "description": "Enum and containers.", "parameters": {"type": "object", "additionalProperties": False,
               "required": ["mode"], "properties": {"mode": {"type": "string", "enum": ["fast", "slow"]},
                                                    "tags": {"type": "array", "items": {"type": "integer"}}, "extra": {"type": "object"}}}},
    "f_doc": {"name": "f_doc", "description": "Documented.", "parameters": {"type": "object", "additionalProperties": False,
              "required": ["query"], "properties": {"query": {"type": "string", "description": "what to look for"},
                                                    "k": {"type": "integer", "description": "how many", "default": 3}}}},
}

@pytest.mark.parametrize("fn", [f_plain, f_enum, f_doc])
def test_schema_matches_the_hand_written_one(fn):
    assert function_schema(fn) == HAND[fn.__name__]


def test_functions_that_cannot_be_described_say_why():
    def no_doc(x: int): pass
    def no_hint(x): "Doc."
    def bad_type(x: set[bytes]): "Doc."
    for fn, words in [(no_doc, "docstring"), (no_hint, "type hint"), (bad_type, "no JSON schema")]:
        with pytest.raises((TypeError, ValueError), match=words): function_schema(fn)


def test_validation_agrees_with_jsonschema_on_random_arguments():
    rng = random.Random(0)
    values = [0, 1, -3, 2.5, True, False, None, "fast", "slow", "x", [], [1, 2], [1, "a"], {}, {"a": 1}]
    names = ["x", "y", "flag", "mode", "tags", "extra", "query", "k", "other"]
    checked = 0
    for schema in HAND.values():
        params = schema["parameters"]
        validator = jsonschema.Draft202012Validator(params)
        for _ in range(300):
            args = {n: rng.choice(values) for n in rng.sample(names, rng.randint(0, 3))}
            try: validate_arguments(args, params); ours = True
            except ToolArgumentError: ours = False
            assert ours == validator.is_valid(args), (schema["name"], args)
            checked += 1
    assert checked == 900


def test_a_tool_never_raises_through_run():
    @tool(timeout_s=0.2)
    def slow(seconds: float) -> str:
        "Sleep."
        time.sleep(seconds); return "done"
    assert slow.run({"seconds": 0.0}) == "done"
    assert slow.run({"seconds": 3}) == "error: slow did not finish within 0.2 s"
    assert slow.run({"second": 1}).startswith("error: slow: missing argument(s): seconds")
    assert slow.run("not an object").startswith("error: slow: arguments must be a JSON object")
    assert calculator.run({"expression": "2 ** 10"}).startswith("error: calculator raised ValueError")
    with pytest.raises(ToolArgumentError): calculator(expression=3)


def test_file_reader_stays_in_its_workspace(tmp_path):
    ws = tmp_path / "ws"; (ws / "sub").mkdir(parents=True); (ws / "sub" / "a.txt").write_text("inside")
    (tmp_path / "secret.txt").write_text("outside"); os.symlink(tmp_path / "secret.txt", ws / "link")
    reader = file_reader(ws)
    assert reader.run({"path": "sub/a.txt"}) == "inside" and reader.run({"path": "sub/../sub/a.txt"}) == "inside"
    for bad in ["../secret.txt", "link", str(tmp_path / "secret.txt"), "sub/../../secret.txt"]:
        obs = reader.run({"path": bad})
        assert obs.startswith("error: read_file raised PermissionError") and "outside" not in obs.split(":", 2)[-1].replace("outside the workspace", "")


def test_bm25_matches_a_float64_reference():
    import math
    docs = [("d0", "red apples and green apples"), ("d1", "green tea"), ("d2", "tea with apples, tea with honey"), ("d3", "nothing here")]
    bm = BM25(docs, k1=1.2, b=0.5)
    toks = [d[1].replace(",", "").split() for d in docs]
    avg = sum(map(len, toks)) / len(toks)
    def ref(q):
        out = []
        for t in toks:
            s = 0.0
            for term in q.split():
                df = sum(term in u for u in toks)
                if term in t:
                    idf = math.log(1 + (len(toks) - df + 0.5) / (df + 0.5)); tf = t.count(term)
                    s += idf * tf * 2.2 / (tf + 1.2 * (0.5 + 0.5 * len(t) / avg))
            out.append(s)
        return out
    for q in ["apples", "green tea", "honey apples tea", "absent"]:
        assert bm.scores(q) == pytest.approx(ref(q), rel=1e-12, abs=1e-12)
    assert [h[0] for h in bm.search("tea", 5)] == ["d2", "d1"]


# -- loops on scripted back ends
def test_react_exact_trace_and_prompts():
    m = ScriptedModel(["Thinking. " + call("calculator", expression="6 * 7"), "It is 42."])
    t = react(m, [calculator], "6 times 7?", system="Be brief.")
    assert t.lines() == ["model: Thinking.", 'tool calculator({"expression": "6 * 7"}) -> 42', "model: It is 42.", "stop: answer"]
    assert m.prompts[1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "6 times 7?"},
                            {"role": "assistant", "content": "Thinking.", "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "calculator", "arguments": '{"expression": "6 * 7"}'}}]},
                            {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    assert t.steps[0].prompt == m.prompts[0] and t.tokens == (5 + 7, 8 + 3)   # whitespace words: prompts of 5 and 7, replies of 8 and 3
    assert "A: It is 42." in str(t)


def test_react_recovers_from_a_malformed_action_an_unknown_tool_and_a_tool_error():
    m = ScriptedModel(['<tool_call>{"name": "calculator"', call("calc", expression="1"), call("calculator", expression="1 / 0"),
                       call("calculator", expression="1 + 1"), "2"])
    t = react(m, [calculator], "1 + 1?")
    assert t.stop == "answer" and t.answer == "2" and t.model_calls == 5
    assert t.lines()[1] == "error: malformed action: unclosed <tool_call> at character 0"
    assert "could not be read (unclosed <tool_call> at character 0)" in m.prompts[1][-1]["content"]
    assert t.lines()[3] == "tool calc({\"expression\": \"1\"}) -> error: no tool named 'calc'; the tools are: calculator"
    assert t.lines()[5].endswith("error: calculator raised ValueError: division by zero in '1 / 0'")
    assert m.prompts[3][-1] == {"role": "tool", "tool_call_id": "call_2", "content": "error: calculator raised ValueError: division by zero in '1 / 0'"}


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_step_limit_and_a_model_that_never_acts_validly(limit):
    busy = react(ScriptedModel([call("calculator", expression="1")], repeat_last=True), [calculator], "q", max_steps=limit)
    assert busy.stop == "step_limit" and busy.model_calls == limit and len(busy.tool_calls) == limit
    assert busy.answer == f"stopped: no final answer within {limit} model turns"
    junk = react(ScriptedModel(["<tool_call>not json</tool_call>"], repeat_last=True), [calculator], "q", max_steps=10, max_malformed=limit)
    assert junk.stop == "malformed" and junk.model_calls == limit and not junk.tool_calls
    assert junk.answer.startswith(f"stopped: the model wrote {limit} malformed actions in a row")


def test_rewoo_trace_placeholders_and_bad_plans():
    plan = 'Plan: a\n#E1 = calculator[{"expression": "2 * 3"}]\nPlan: b\n#E2 = calculator[{"expression": "#E1 * #E1"}]'
    m = ScriptedModel(["no plan at all", plan, "36"])
    t = rewoo(m, [calculator], "q")
    assert t.lines() == ["plan: no plan at all", "error: malformed plan: the plan has no step (#E1 = tool[{...}])", "plan: " + plan,
                         'tool calculator({"expression": "2 * 3"}) -> 6', 'tool calculator({"expression": "6 * 6"}) -> 36',
                         "model: 36", "stop: answer"]
    assert t.model_calls == 3 and sum(s.kind == "plan" for s in t.steps) == 2
    fwd = rewoo(ScriptedModel(['#E1 = calculator[{"expression": "#E2"}]', "?"]), [calculator], "q")
    assert fwd.tool_calls[0]["arguments"] == {"expression": "#E2"} and fwd.steps[1].text == "error: #E1 uses #E2, which is not computed before it"
    failed = rewoo(ScriptedModel(["#E1 = calculator(1)"], repeat_last=True), [calculator], "q", max_plans=3)
    assert failed.stop == "plan_failed" and sum(s.kind == "plan" for s in failed.steps) == 3
    with pytest.raises(ValueError, match="not JSON"): parse_plan("#E1 = calculator[{oops}]")
    @tool
    def half(x: float, n: int = 1) -> float:
        "Halve x, n times."
        return x / 2**n
    num = rewoo(ScriptedModel(['#E1 = calculator[{"expression": "7 * 2"}]\n#E2 = half[{"x": "#E1", "n": "#E1"}]\n#E3 = half[{"x": "#E1 kg"}]', "ok"]),
                [calculator, half], "q")
    assert num.tool_calls[1]["arguments"] == {"x": 14.0, "n": 14} and num.steps[2].text == str(14 / 2**14)
    assert num.steps[3].text == "error: half: argument 'x' must be a number, got str '14 kg'"


def test_scripted_model_that_runs_out_says_so():
    m = ScriptedModel(["a"]); m.chat([])
    with pytest.raises(RuntimeError, match="ran out of replies after 1 turns"): m.chat([])


PASSAGES = "\n\n".join(" ".join(f"w{p}x{i}" for i in range(30)) + "." for p in range(20))   # clauses the reading set can ask about


def test_tool_use_success_and_the_held_out_set():
    cases = held_out_arithmetic(16, 4, seed=1337)
    from course_lib.sft import make_sft_sets
    ref = make_sft_sets(16, 4, seed=1337, records=[{"id": "d", "text": PASSAGES}])["tool_use"]["test"]
    assert cases == ref
    assert agent_success(lambda: ScriptedModel(calculator_policy()), cases)["success"] == 1.0
    e = cases[0]["expect"]
    wrong = react(ScriptedModel([call("calculator", expression="1 + 1"), f"It is {e['result']}."]), [calculator], "q")
    unstated = react(ScriptedModel([call("calculator", expression=e["expression"]), "I do not know."]), [calculator], "q")
    assert not tool_use_success(wrong, e) and not tool_use_success(unstated, e)


# -- the course model directly and behind chapter 7's server
@pytest.fixture(scope="module")
def tiny():
    return tiny_chat_model(vocab_size=300, max_seq_len=1024)


def test_course_model_and_the_server_agree(tiny):
    from course_lib.engine import LLMEngine
    from course_lib.serve import create_app, serve_in_thread
    model, tok = tiny
    local = CourseModel(model, tok, max_new_tokens=12, tools_in_prompt=True)   # the server puts the tools in the prompt
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    a = local.chat(msgs, [calculator.schema()])
    url, stop = serve_in_thread(create_app(LLMEngine(model, num_blocks=64, block_size=8), tok, "tiny",
                                           eos_ids=[tok.special_tokens["<|im_end|>"]]))
    try:
        b = OpenAIChat(url + "/v1", "tiny", max_tokens=12).chat(msgs, [calculator.schema()])
        t = react(OpenAIChat(url + "/v1", "tiny", max_tokens=8), [calculator], "2 + 2?", max_steps=2)
    finally: stop()
    assert a.prompt_tokens == b.prompt_tokens > 0 and a.completion_tokens == b.completion_tokens > 0
    assert a.content == b.content and not a.tool_calls and not b.tool_calls   # greedy on both sides: the same text
    assert t.stop in ("answer", "step_limit", "malformed") and t.model_calls <= 2
    local_trace = react(local, [calculator], "2 + 2?", max_steps=2)
    assert local_trace.model_calls <= 2 and local_trace.answer and local_trace.tokens[0] > 0


# -- hostile code through the interpreter tool
MARK = f"camp-{uuid.uuid4().hex[:8]}"

def _host_processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in open(f"/proc/{pid}/cmdline", "rb").read(): found.append(int(pid))
        except OSError: pass
    return found

def _attacks(secret, outside, port) -> dict:
    return {
        "read_hidden_file": (f"print(open({str(secret)!r}).read())", ("hide",)),
        "write_outside": (f"open({str(outside)!r}, 'w').write('pwned'); print('wrote')", ("write",)),
        "socket": (f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')", ("network",)),
        "fork_bomb": ("import os\nwhile True:\n    os.fork()", ()),
        "memory_bomb": ("x = bytearray(8 * 2**30); print('allocated')", ()),
        "infinite_loop": ("while True: pass", ()),
        "huge_output": ("print('x' * 50_000_000)", ()),
        "subprocess": (f"import subprocess; subprocess.Popen(['sh', '-c', 'exec -a {MARK} sleep 300'], start_new_session=True); print('spawned')", ("cleanup",)),
        "signal_parent": (f"import os, signal\nfor p in ({os.getpid()}, os.getppid(), 1, -1):\n    try: os.kill(p, signal.SIGKILL)\n    except OSError as e: print(p, type(e).__name__)", ("signals",)),
        "ptrace_parent": (f"import ctypes; print('ptrace', ctypes.CDLL(None).ptrace(16, {os.getpid()}, 0, 0))", ("signals",)),
    }

ESCAPES = {"read_hidden_file": lambda obs, ctx: "top secret" in obs, "write_outside": lambda obs, ctx: ctx["outside"].exists(),
           "socket": lambda obs, ctx: ctx["accepted"], "huge_output": lambda obs, ctx: len(obs) > 10_000,
           "subprocess": lambda obs, ctx: bool(_host_processes_with(MARK)), "ptrace_parent": lambda obs, ctx: "ptrace 0" in obs}


@pytest.fixture(scope="module")
def listener():
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(); srv.settimeout(0.2)
    state = {"accepted": False, "stop": False}
    def loop():
        while not state["stop"]:
            try: srv.accept()[0].close(); state["accepted"] = True
            except OSError: pass
    th = threading.Thread(target=loop, daemon=True); th.start()
    yield srv.getsockname()[1], state
    state["stop"] = True; th.join(); srv.close()


@pytest.mark.parametrize("name", list(_attacks("s", "o", 0)))
def test_hostile_code_is_contained(name, tmp_path, listener):
    port, state = listener
    secret = tmp_path / "hidden" / "s.txt"; secret.parent.mkdir(); secret.write_text("top secret")
    outside = tmp_path / "outside.txt"
    code, needs = _attacks(secret, outside, port)[name]
    state["accepted"] = False
    interp = PythonInterpreter(SandboxLimits(cpu_s=20, wall_s=4, memory_mb=512, output_bytes=20_000, file_mb=4), hidden=[secret.parent])
    try:
        start = time.monotonic()
        obs = interp.tool.run({"code": code})
        took = time.monotonic() - start
        after = interp.tool.run({"code": "print(6 * 7)"})   # the tool still works (restarted if the attack killed the sandbox)
    finally: interp.close()
    time.sleep(0.3)
    escaped = ESCAPES.get(name, lambda obs, ctx: False)(obs, {"outside": outside, **state})
    missing = set(needs) & set(isolation().missing)
    assert took < 15, f"{name} took {took:.1f} s"
    assert after == "42", after
    assert os.getppid() > 1      # we are alive and still have our parent
    for pid in _host_processes_with(MARK): os.kill(pid, 9)
    if missing: pytest.xfail(f"this machine cannot guarantee {missing}")   # documented in Isolation.missing
    assert not escaped, (name, obs[:300])


def test_agents_stage_reports_the_reference_and_each_model(tmp_path, tiny):
    from course_lib.core import RunContext, load_settings
    from course_lib.agent_systems import agents_stage
    from course_lib.model import export_hf
    from course_lib.tokenizer import save_hf
    model, tok = tiny
    ctx = RunContext(tmp_path / "run", load_settings("ci"))
    folder = ctx.run_dir / "finetune" / "merged"
    export_hf(model, folder); save_hf(tok, folder)
    report = agents_stage(ctx)
    rows = json.loads((ctx.run_dir / "agents" / "tool_use.json").read_text())
    assert set(rows) == {"scripted (reference)", "fine-tuned (finetune/merged)"}   # no pretrain/model in this run
    assert rows["scripted (reference)"]["success"] == 1.0 and rows["scripted (reference)"]["n"] == 3
    tuned = rows["fine-tuned (finetune/merged)"]
    assert tuned["n"] == 3 and 0 <= tuned["success"] <= 1 and 1 <= tuned["model_calls"] <= 3
    assert "| scripted (reference) | 100% |" in report and ctx.summary["agents"] == rows


def test_mind_search_runs_independent_nodes_concurrently():
    barrier = threading.Barrier(2, timeout=10)   # passes only if both independent searchers are inside the tool at once
    @tool(timeout_s=20)
    def meet(who: str) -> str:
        "Wait for the other searcher."
        barrier.wait(); return f"{who} met"
    plan = "Q1 []: first\nQ2 []: second\nQ3 [Q2, Q1]: both"
    script = {"Q1": [call("meet", who="a"), "A"], "Q2": [call("meet", who="b"), "B"], "Q3": ["A and B"]}
    events = []
    t, nodes = mind_search(ScriptedModel([plan, "done [Q1][Q2][Q3]"]), lambda n: ScriptedModel(script[n]), [meet], "q",
                           on_event=lambda e, n, x: events.append((e, n)))
    assert [nodes[n].answer for n in ("Q1", "Q2", "Q3")] == ["A", "B", "A and B"]
    assert nodes["Q1"].steps[1].text == "a met" and nodes["Q2"].steps[1].text == "b met"
    assert sorted(events[:2]) == [("start", "Q1"), ("start", "Q2")] and events[-2:] == [("start", "Q3"), ("done", "Q3")]
    assert nodes["Q3"].question == "Known:\nQ2 (second): B\nQ1 (first): A\n\nboth"
    assert t.answer == "done [Q1][Q2][Q3]" and "[Q3] both -> A and B" in t.steps[-1].prompt[0]["content"]


def test_mind_search_bad_graphs_and_a_broken_searcher():
    for text, words in [("no lines", "no sub-question"), ("Q1 [Q9]: x", "unknown Q9"), ("Q1 [Q2]: x\nQ2 [Q1]: y", "cycle")]:
        with pytest.raises(ValueError, match=words): parse_graph(text)
        t, nodes = mind_search(ScriptedModel([text]), lambda n: None, [calculator], "q")
        assert t.stop == "plan_failed" and nodes == {} and words.split()[-1] in t.answer
    def broken(node):
        if node == "Q1": raise RuntimeError("searcher down")
        return ScriptedModel(["fine"])
    t, nodes = mind_search(ScriptedModel(["Q1 []: a\nQ2 [Q1]: b", "merged"]), broken, [calculator], "q")
    assert nodes["Q1"].answer == "error: RuntimeError: searcher down" and nodes["Q2"].answer == "fine" and t.answer == "merged"


def test_mcp_client_lists_and_calls_the_course_tools(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    local = [calculator, file_reader(tmp_path)]
    remote = mcp_tools(mcp_server(local))
    assert [t.schema() for t in remote] == [t.schema() for t in local]
    assert remote[0].run({"expression": "(2 + 3) * 4"}) == "20" and remote[1].run({"path": "a.txt"}) == "hello"
    assert remote[1].run({"path": "../x"}).startswith("error: read_file raised PermissionError")
    assert remote[0].run({"expression": "1", "x": 2}) == "error: calculator: unknown argument(s): x; expected expression"   # checked client-side
