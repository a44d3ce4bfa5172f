"""Chapter 9's transformers back end against transformers called directly (and the course model) on the exported tiny
chat model, and MCP over stdio with the server in a real subprocess."""
import json

import pytest
import torch

from course_lib.agents import CourseModel, TransformersChat, calculator, react
from course_lib.model import export_hf
from course_lib.tokenizer import save_hf
from tiny import tiny_chat_model

CALL = {"id": "call_9", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6 * 7"}'}}
CONV = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": "Let me see.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_9", "content": "42"}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    "The tiny chat model exported in the Llama layout with its tokenizer: (folder, model, tokenizer)."
    model, tok = tiny_chat_model(vocab_size=300, max_seq_len=1024)
    folder = tmp_path_factory.mktemp("tiny")
    save_hf(tok, folder / "tok")
    export_hf(model, folder / "model", tokenizer=folder / "tok" / "tokenizer.json")
    return folder / "model", model, tok


def direct(folder, messages, max_new_tokens):
    "What transformers writes when called by hand: the template, greedy generate, decode up to <|im_end|>."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=[end, tok.eos_token_id], pad_token_id=end)[0, ids.shape[1]:].tolist()
    return tok.decode([t for t in out if t not in (end, tok.eos_token_id)]), ids.shape[1]


def test_transformers_back_end_writes_what_transformers_writes(exported):
    folder, _, _ = exported
    ours = TransformersChat(folder, max_new_tokens=16, tools_in_prompt=False).chat(CONV)
    # the conversation as the template sees it, folded by hand: the call as chapter 5's <tool_call> text
    by_hand = CONV[:2] + [{"role": "assistant", "content": 'Let me see.<tool_call>{"name": "calculator", "arguments": {"expression": "6 * 7"}}</tool_call>'},
                          {"role": "tool", "content": "42"}]
    text, n_prompt = direct(folder, by_hand, 16)
    assert ours.prompt_tokens == n_prompt and ours.completion_tokens >= 1
    assert ours.content == text.strip() and ours.error is None


def test_transformers_back_end_agrees_with_the_course_model(exported):
    folder, model, tok = exported
    hf = TransformersChat(folder, max_new_tokens=20).chat(CONV, [calculator.schema()])
    course = CourseModel(model, tok, max_new_tokens=20, tools_in_prompt=True).chat(CONV, [calculator.schema()])
    assert (hf.content, hf.prompt_tokens) == (course.content, course.prompt_tokens)


def test_transformers_back_end_in_a_loop_and_bad_folders(exported, tmp_path):
    folder, _, _ = exported
    t = react(TransformersChat(folder, max_new_tokens=8), [calculator], "2 + 2?", max_steps=2)
    assert t.stop in ("answer", "step_limit", "malformed") and 1 <= t.model_calls <= 2
    with pytest.raises(FileNotFoundError, match="config.json"): TransformersChat(tmp_path)


# -- MCP over stdio, the server in a real subprocess
def test_mcp_over_stdio_by_hand_and_through_a_held_session():
    import subprocess
    from course_lib.agent_systems import MCPConnection, mcp_stdio_command
    params = mcp_stdio_command(("calculator",))
    child = subprocess.Popen([params.command, *params.args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=params.env)
    def rpc(msg):   # the transport by hand: one JSON-RPC message a line, as the MCP specification's stdio section says
        child.stdin.write(json.dumps(msg) + "\n"); child.stdin.flush()
        return json.loads(child.stdout.readline()) if "id" in msg else None
    try:
        hello = rpc({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                     "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}})
        rpc({"jsonrpc": "2.0", "method": "notifications/initialized"})
        listed = rpc({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})["result"]["tools"]
        ok = rpc({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "calculator", "arguments": {"expression": "19 * 3"}}})
        bad = rpc({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "calculator", "arguments": {"expression": 5}}})
    finally:
        child.stdin.close(); rc = child.wait(timeout=60)
    assert rc == 0 and hello["id"] == 1 and hello["result"]["serverInfo"]["name"] == "llm-camp"
    assert listed == [{"name": "calculator", "description": calculator.description, "inputSchema": calculator.parameters}]
    assert ok["result"] == {"content": [{"type": "text", "text": "57"}], "isError": False}
    assert bad["result"]["isError"] and "must be a string" in bad["result"]["content"][0]["text"]

    with MCPConnection(mcp_stdio_command(("calculator", "python"))) as conn:   # one server process for every call
        calc, py = conn.tools()
        assert (calc.name, py.name) == ("calculator", "python") and calc.schema() == calculator.schema()
        assert py.run({"code": "x = 20"}) == "(no output)" and py.run({"code": "print(x + 22)"}) == "42"   # state kept across calls
        assert calc.run({"expression": 3}).startswith("error: calculator: argument 'expression' must be a string")   # checked here first
        assert calc.run({"expression": "1 / 0"}).startswith("error: calculator raised ValueError: division by zero")
