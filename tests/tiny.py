"""The tiny chat model the serving, agent and demo tests share: a seeded, untrained Decoder with a BPE tokenizer that
knows the chat specials, small enough to build in a second."""
import json

import torch

from course_lib.model import Decoder, get_config
from course_lib.tokenizer import DEFAULT_SPECIALS, Tokenizer, train_bpe


def tiny_chat_model(vocab_size: int = 320, max_seq_len: int = 256) -> tuple[Decoder, Tokenizer]:
    "(model, tokenizer), the same for the same arguments: BPE trained on the json module's source, weights from seed 0."
    vocab, merges = train_bpe([open(json.__file__).read()], vocab_size, special_tokens=DEFAULT_SPECIALS, processes=1)
    tok = Tokenizer(vocab, merges, list(DEFAULT_SPECIALS))
    torch.manual_seed(0)
    model = Decoder(get_config("cpu-1m", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               d_ff=64, max_seq_len=max_seq_len, init_std=0.2)).eval()
    return model, tok
