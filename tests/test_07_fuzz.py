"""Chapter 7's server fuzzed from its own OpenAPI schema (schemathesis, in-process over ASGI): no input gives a 5xx,
and no request is left holding KV blocks."""
import json
import time

import pytest
import torch

import schemathesis  # required: the [dev] extra
from hypothesis import HealthCheck, settings

from course_lib.engine import LLMEngine
from course_lib.model import Decoder, get_config
from course_lib.serve import create_app
from course_lib.tokenizer import DEFAULT_SPECIALS, Tokenizer, train_bpe

vocab, merges = train_bpe([open(json.__file__).read()], 300, special_tokens=DEFAULT_SPECIALS, processes=1)
TOK = Tokenizer(vocab, merges, list(DEFAULT_SPECIALS))
torch.manual_seed(0)
ENGINE = LLMEngine(Decoder(get_config("cpu-1m", vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                      d_ff=64, max_seq_len=64)), num_blocks=32, block_size=8)
APP = create_app(ENGINE, TOK, "tiny")
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_no_leaked_blocks(case):
    response = case.call()
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400: assert "error" in response.json() or "detail" in response.json()
    deadline = time.time() + 10
    while time.time() < deadline and (ENGINE.bm.num_used or ENGINE.has_unfinished()): time.sleep(0.01)
    assert ENGINE.bm.num_used == 0 and not ENGINE.has_unfinished(), ENGINE.metrics()
