"""Helpers for the bring-your-own data/reward/rollout tests: a real HF tokenizer with a chat
template, built offline, whose vocabulary fits the tiny model's 64 ids."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>", "system", "user",
         "assistant", "what", "is", "plus", "?", "the", "answer", "\\boxed{", "}", "tool", "says",
         "try", "again", "ok", "be", "brief", *map(str, range(40))]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def chat_tokenizer(out_dir: str | Path, *, template: bool = True):
    """Save a word-level fast tokenizer (ids as in the tiny model: pad 0, bos 1, eos 2) with a
    ChatML-like template to ``out_dir``; returns the transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert len(WORDS) == 64
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def problems(count: int, *, offset: int = 0) -> list[dict]:
    """``count`` addition problems with an answer and a metadata field."""
    return [{"question": f"what is {a} plus {b} ?", "label": a + b, "source": f"toy-{a}-{b}"}
            for a, b in ((i % 20, (i * 7 + offset) % 19) for i in range(count))]


class RewardServer:
    """A remote reward server on localhost: the first `fail_first` requests answer 503; each
    request takes `delay` seconds; it records the most requests it had in flight at once."""

    def __init__(self, *, fail_first=0, delay=0.0):
        self.fail_left, self.delay = fail_first, delay
        self.in_flight = self.max_in_flight = self.requests = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    fail = outer.fail_left > 0
                    outer.fail_left -= fail
                time.sleep(outer.delay)
                with outer.lock:
                    outer.in_flight -= 1
                if fail:
                    self.send_response(503)
                    self.end_headers()
                    return
                reply = json.dumps({"score": float(body["response"] == body["answer"]),
                                    "tokens": len(body["response_ids"])}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except BrokenPipeError:
                    pass  # the client timed out and left, as it should

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
