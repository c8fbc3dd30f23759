"""tests/test_pyclient.py: client/python/duet_client.py against a fake duetd.

The fake duetd is a pyzmq ROUTER on tcp://127.0.0.1 (ephemeral port) served by a thread;
it checks the framing and fields of what the client sends and answers as each test
scripts it. Run: .venv/bin/python -m pytest -q tests/test_pyclient.py
(also from `make test` through tests/test_pyclient_run.c).
"""
import json
import os
import sys
import threading
import time

import pytest
import zmq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client", "python"))
from duet_client import ERROR_CODES, Client, Delta, DuetError, Result  # noqa: E402

TAG = b"duet.client/1"
GENERATE_FIELDS = {"id", "prompt", "messages", "tokens", "sampling", "max_tokens", "stop",
                   "stop_token_ids", "ignore_eos", "stream", "session"}
SAMPLING_FIELDS = {"temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                   "repeat_last_n", "seed"}
USAGE = {"prompt_tokens": 6, "cached_prompt_tokens": 2, "completion_tokens": 3, "retries": 0}
TIMINGS = {"queue_ms": 0.4, "ttft_ms": 21.5, "tpot_ms_mean": 6.2, "total_ms": 33.9}
HEALTH = {"ok": True, "state": "ready", "groups_ready": 2, "workers_alive": 2, "uptime_s": 3600.5}
STATUS = {"version": "duet 0.1.0", "model": "SmolLM2 135M Instruct", "uptime_s": 3600.5,
          "groups": [], "workers": [],
          "kv": {"blocks_total": 0, "blocks_used": 0, "blocks_cached": 0, "use": 0},
          "queue": {"waiting": 0, "running": 0, "limit": 1024},
          "prefix_cache": {"prompt_tokens": 0, "cached_tokens": 0, "hit_rate": 0},
          "transfers": {"completed": 0, "failed": 0, "in_flight": 0, "bytes": 0,
                        "mean_ms": 0, "max_ms": 0},
          "requests": {"served": 0, "failed": 0, "cancelled": 0, "retried": 0}}


class Fake:
    """A fake duetd: handler(fake, route, cmd, body) runs on the server thread for each
    well-formed message; what arrived is recorded in .received, problems in .invalid."""

    def __init__(self, handler=None):
        self.handler = handler
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.received = []  # (cmd, body)
        self.invalid = []
        self.lock = threading.Lock()
        self.state = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _check(self, frames):
        if len(frames) != 4:
            return f"expected route + 3 frames, got {len(frames)}"
        if frames[1] != TAG:
            return f"tag {frames[1]!r}"
        cmd = frames[2].decode()
        if cmd not in ("generate", "cancel", "status", "health"):
            return f"command {cmd}"
        body = json.loads(frames[3])
        if not isinstance(body, dict):
            return "body not an object"
        if cmd == "generate":
            if set(body) - GENERATE_FIELDS:
                return f"unknown generate fields {set(body) - GENERATE_FIELDS}"
            if set(body.get("sampling", {})) - SAMPLING_FIELDS:
                return "unknown sampling fields"
            if sum(k in body for k in ("prompt", "messages", "tokens")) != 1:
                return "not exactly one prompt form"
            if not isinstance(body.get("id"), str):
                return "no id"
        elif cmd == "cancel":
            if set(body) != {"id"}:
                return f"cancel body {body}"
        elif body:
            return f"{cmd} body {body}"
        return None

    def _run(self):
        while not self._stop:
            if not self.sock.poll(20):
                continue
            frames = self.sock.recv_multipart()
            problem = self._check(frames)
            with self.lock:
                if problem:
                    self.invalid.append(problem)
                    continue
                cmd, body = frames[2].decode(), json.loads(frames[3])
                self.received.append((cmd, body))
            if self.handler:
                self.handler(self, frames[0], cmd, body)

    def send(self, route, cmd, body):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        if isinstance(data, str):
            data = data.encode()
        self.sock.send_multipart([route, TAG, cmd.encode(), data])

    def send_raw(self, route, *frames):
        self.sock.send_multipart([route] + [f if isinstance(f, bytes) else f.encode() for f in frames])

    def count(self, cmd):
        with self.lock:
            return sum(1 for c, _ in self.received if c == cmd)

    def bodies(self, cmd):
        with self.lock:
            return [b for c, b in self.received if c == cmd]

    def wait_count(self, cmd, n, timeout=5.0):
        end = time.monotonic() + timeout
        while self.count(cmd) < n and time.monotonic() < end:
            time.sleep(0.005)
        assert self.count(cmd) >= n

    def stop(self):
        self._stop = True
        self._thread.join()
        self.sock.close(0)
        self.ctx.term()
        assert not self.invalid, self.invalid


@pytest.fixture
def fake():
    fakes = []

    def start(handler=None):
        f = Fake(handler)
        fakes.append(f)
        return f

    yield start
    for f in fakes:
        f.stop()


def serve_paris(f, route, body):
    rid = body["id"]
    f.send(route, "accepted", {"id": rid, "prompt_tokens": 6, "max_tokens": 16, "seed": 42})
    if body.get("stream"):
        f.send(route, "delta", {"id": rid, "index": 0, "text": " Paris", "token_ids": [7042]})
        f.send(route, "delta", {"id": rid, "index": 1, "text": ".", "token_ids": [30], "extra": 1})
        f.send(route, "delta", {"id": rid, "index": 2, "text": "", "token_ids": [2]})
        f.send(route, "done", {"id": rid, "finish_reason": "eos", "usage": USAGE, "timings": TIMINGS})
    else:
        f.send(route, "done", {"id": rid, "finish_reason": "eos", "text": " Paris.",
                               "token_ids": [7042, 30, 2], "usage": USAGE, "timings": TIMINGS})


def good(f, route, cmd, body):
    if cmd == "generate":
        serve_paris(f, route, body)
    elif cmd == "status":
        f.send(route, "status", STATUS)
    elif cmd == "health":
        f.send(route, "health", f.state.get("health", HEALTH))
    elif cmd == "cancel":
        f.send(route, "error", {"id": body["id"], "code": "not_found", "message": "no request",
                                "command": "cancel"})


# ---- streaming, results --------------------------------------------------------------------

def test_stream_order(fake):
    f = fake(good)
    with Client(f.endpoint, timeout=5) as c:
        req = c.generate(prompt="The capital of France is", max_tokens=16, temperature=0)
        items = list(req)
        deltas, res = items[:-1], items[-1]
        assert [d.index for d in deltas] == [0, 1, 2]
        assert all(isinstance(d, Delta) and d.kind == "delta" for d in deltas)
        assert "".join(d.text for d in deltas) == " Paris."
        assert isinstance(res, Result) and res.kind == "result"
        assert res.text == " Paris." and res.token_ids == [7042, 30, 2]
        assert res.finish_reason == "eos"
        assert res.usage.cached_prompt_tokens == 2 and res.usage.completion_tokens == 3
        assert res.timings.ttft_ms == 21.5
        assert res.seed == 42 and res.prompt_tokens == 6 and res.max_tokens == 16
        assert req.accepted == {"prompt_tokens": 6, "max_tokens": 16, "seed": 42}
        assert list(req) == []  # exhausted
        assert req.result() is res
    sent = f.bodies("generate")[0]
    assert sent == {"id": "r1", "prompt": "The capital of France is",
                    "sampling": {"temperature": 0}, "max_tokens": 16, "stream": True}


def test_nonstream_complete_and_forms(fake):
    f = fake(good)
    with Client(f.endpoint, timeout=5) as c:
        res = c.complete(token_ids=[1, 504, 3458, 282], seed=7, id="t3")
        assert res.id == "t3" and res.text == " Paris." and res.token_ids == [7042, 30, 2]
        req = c.generate(messages=[{"role": "system", "content": "You are terse."},
                                   {"role": "user", "content": "Name a prime number."}],
                         stop=["\n\n"], session="alice-1", stream=False)
        assert [type(x) for x in req] == [Result]
        # Bad arguments never reach duetd.
        with pytest.raises(TypeError):
            c.generate(prompt="hi", temprature=0)
        with pytest.raises(TypeError):
            c.generate(prompt="hi", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(TypeError):
            c.generate()
    gens = f.bodies("generate")
    assert len(gens) == 2
    assert gens[0]["tokens"] == [1, 504, 3458, 282] and gens[0]["sampling"] == {"seed": 7}
    assert "stream" not in gens[0]
    assert gens[1]["session"] == "alice-1" and gens[1]["stop"] == ["\n\n"]
    assert gens[1]["messages"][1] == {"role": "user", "content": "Name a prime number."}


# ---- multiplexing --------------------------------------------------------------------------

N_MUX = 8


def mux(f, route, cmd, body):
    if cmd != "generate":
        return
    held = f.state.setdefault("held", [])
    held.append((route, body["id"]))
    if len(held) < N_MUX:
        return
    for i, (rt, rid) in reversed(list(enumerate(held))):
        f.send(rt, "accepted", {"id": rid, "prompt_tokens": i + 1, "max_tokens": 3, "seed": i})
    for k in range(3):
        for i, (rt, rid) in enumerate(held):
            f.send(rt, "delta", {"id": rid, "index": k, "text": f"{rid}.{k} ",
                                 "token_ids": [100 * i + k]})
    for rt, rid in reversed(held):
        f.send(rt, "done", {"id": rid, "finish_reason": "length", "usage": USAGE, "timings": TIMINGS})
    held.clear()


def test_multiplex_8(fake):
    f = fake(mux)
    with Client(f.endpoint, timeout=5) as c:
        reqs = [c.generate(prompt="hello", id=f"q-{i}") for i in range(N_MUX)]
        for i in reversed(range(N_MUX)):  # read in any order; the others queue
            items = list(reqs[i])
            rid = f"q-{i}"
            assert [d.token_ids[0] for d in items[:-1]] == [100 * i, 100 * i + 1, 100 * i + 2]
            assert items[-1].text == f"{rid}.0 {rid}.1 {rid}.2 "
            assert reqs[i].accepted["prompt_tokens"] == i + 1
    assert f.count("cancel") == 0


# ---- cancel --------------------------------------------------------------------------------

def canceller(f, route, cmd, body):
    rid = body.get("id")
    if cmd == "generate":
        f.send(route, "accepted", {"id": rid, "prompt_tokens": 2, "max_tokens": 100, "seed": 1})
        f.send(route, "delta", {"id": rid, "index": 0, "text": "Once", "token_ids": [9]})
    elif cmd == "cancel":
        if rid == "lost":
            f.send(route, "error", {"id": rid, "code": "not_found", "message": "no request 'lost'",
                                    "command": "cancel"})
            return
        f.send(route, "done", {"id": rid, "finish_reason": "cancelled", "usage": USAGE,
                               "timings": TIMINGS})
        f.send(route, "error", {"id": rid, "code": "not_found", "message": "no request",
                                "command": "cancel"})


def test_cancel(fake):
    f = fake(canceller)
    with Client(f.endpoint, timeout=5) as c:
        req = c.generate(prompt="Tell me a story", id="story")
        it = iter(req)
        assert next(it).text == "Once"
        req.cancel()
        req.cancel()  # idempotent
        res = req.result()
        assert res.finish_reason == "cancelled" and res.text == "Once"
        f.wait_count("cancel", 1)
        # The id is free again; the crossing not_found does not end the new request.
        req2 = c.generate(prompt="again", id="story")
        assert next(iter(req2)).text == "Once"
        c.cancel("story")
        assert req2.result().finish_reason == "cancelled"
        # not_found for a request never seen finishing: duetd lost it.
        lost = c.generate(prompt="x", id="lost")
        next(iter(lost))
        lost.cancel()
        with pytest.raises(DuetError) as e:
            lost.result()
        assert e.value.code == "not_found" and e.value.id == "lost"
    assert f.count("cancel") == 3


# ---- error codes ---------------------------------------------------------------------------

def erring(f, route, cmd, body):
    code, after = f.state["code"], f.state["after"]
    if cmd in ("status", "health"):
        f.send(route, "error", {"code": code, "message": f"{cmd} failed here", "command": cmd})
        return
    if cmd != "generate":
        return
    rid = body["id"]
    if after:
        f.send(route, "accepted", {"id": rid, "prompt_tokens": 2, "max_tokens": 10, "seed": 1})
        f.send(route, "delta", {"id": rid, "index": 0, "text": "x", "token_ids": [5]})
    err = {"id": rid, "code": code, "message": f"generate: {code} for '{rid}'", "command": "generate"}
    if code == "busy":
        err["retry_after_ms"] = 250
    f.send(route, "error", err)


@pytest.mark.parametrize("after", [False, True])
def test_every_error_code(fake, after):
    f = fake(erring)
    f.state["after"] = after
    with Client(f.endpoint, timeout=5) as c:
        for code in ERROR_CODES:
            f.state["code"] = code
            req = c.generate(prompt="hi")
            got = []
            with pytest.raises(DuetError) as e:
                for item in req:
                    got.append(item)
            assert e.value.code == code and e.value.wire_code == code
            assert code in e.value.message and e.value.id == req.id
            assert e.value.retry_after_ms == (250 if code == "busy" else 0)
            assert [d.text for d in got] == (["x"] if after else [])
            assert req.done and req.error is e.value
        f.state["code"] = "quota_exceeded"  # unknown to this client: internal
        with pytest.raises(DuetError) as e:
            c.generate(prompt="hi").result()
        assert e.value.code == "internal" and e.value.wire_code == "quota_exceeded"
        f.state["code"] = "unavailable"
        with pytest.raises(DuetError) as e:
            c.status()
        assert e.value.code == "unavailable" and "status failed here" in e.value.message
        with pytest.raises(DuetError) as e:
            c.health()
        assert e.value.code == "unavailable"


def test_duplicate_id(fake):
    f = fake()  # never answers: the first stays in flight
    with Client(f.endpoint, timeout=5) as c:
        c.generate(prompt="hi", id="same")
        with pytest.raises(DuetError) as e:
            c.generate(prompt="hi", id="same")
        assert e.value.code == "duplicate_id"
    assert f.count("generate") == 1


# ---- silence, absence ----------------------------------------------------------------------

def test_timeout_silent_server(fake):
    f = fake()
    with Client(f.endpoint, timeout=0.2) as c:
        req = c.generate(prompt="hi")
        t0 = time.monotonic()
        with pytest.raises(DuetError) as e:
            list(req)
        dt = time.monotonic() - t0
        assert e.value.code == "timeout" and 0.19 <= dt < 2.0
        with pytest.raises(DuetError) as e:
            req.result(timeout=0.05)
        assert e.value.code == "timeout"
        assert not req.done
        with pytest.raises(DuetError) as e:
            c.status(timeout=0.1)
        assert e.value.code == "timeout"
        with pytest.raises(DuetError) as e:
            c.health(timeout=0.1)
        assert e.value.code == "timeout"
        assert c.poll(0.05) == 0
    assert req.done and req.error.code == "usage"  # closed


def test_unreachable():
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind("tcp://127.0.0.1:*")
    ep = s.getsockopt(zmq.LAST_ENDPOINT).decode()
    s.close(0)
    ctx.term()
    with Client(ep, send_timeout=0.15) as c:
        t0 = time.monotonic()
        with pytest.raises(DuetError) as e:
            c.generate(prompt="hi")
        assert e.value.code == "unreachable" and ep in e.value.message
        assert time.monotonic() - t0 < 2.0
    with pytest.raises(TypeError):
        Client("nonsense://x")


def test_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv("DUET_ENDPOINT", "tcp://127.0.0.1:1")
    with Client() as c:
        assert c.endpoint == "tcp://127.0.0.1:1"
    monkeypatch.delenv("DUET_ENDPOINT")
    with Client() as c:
        assert c.endpoint == "tcp://127.0.0.1:7070"


# ---- malformed replies ---------------------------------------------------------------------

def bad(f, route, cmd, body):
    kind = f.state["kind"]
    if cmd == "status":
        f.send(route, "status", {"version": "x", "model": "m", "uptime_s": 1})  # fields missing
        return
    if cmd == "health":
        f.send(route, "health", '{"ok": tru')
        return
    if cmd != "generate":
        return
    rid = body["id"]
    acc = {"id": rid, "prompt_tokens": 2, "max_tokens": 10, "seed": 1}
    delta0 = {"id": rid, "index": 0, "text": "a", "token_ids": [1]}
    if kind in ("raw", "raw_only"):
        f.send_raw(route, TAG, "delta")
        f.send_raw(route, "duet.worker/1", "delta", "{}")
        f.send_raw(route, TAG, "delta", '{"id": ')
        f.send_raw(route, TAG, "done", "[1, 2]")
        f.send_raw(route, TAG, "done", '{"id": "a", "id": "b"}')
        f.send_raw(route, TAG, "deltas", "{}")
        f.send_raw(route, TAG, "delta", b"\xff\xfe")
        f.send_raw(route, TAG, "delta", "{}", "{}")
        if kind == "raw":
            serve_paris(f, route, body)
    elif kind == "schema":
        f.send(route, "accepted", acc)
        f.send(route, "delta", {"id": rid, "text": "a", "token_ids": [1]})
    elif kind == "early_delta":
        f.send(route, "delta", delta0)
    elif kind == "gap":
        f.send(route, "accepted", acc)
        f.send(route, "delta", delta0)
        f.send(route, "delta", dict(delta0, index=2))
    elif kind == "nostream_delta":
        f.send(route, "accepted", acc)
        f.send(route, "delta", delta0)
    elif kind == "done_early":
        f.send(route, "done", {"id": rid, "finish_reason": "eos", "usage": USAGE, "timings": TIMINGS})
    elif kind == "bad_usage":
        f.send(route, "accepted", acc)
        f.send(route, "done", {"id": rid, "finish_reason": "eos", "usage": {"prompt_tokens": -1},
                               "timings": TIMINGS})
    elif kind == "two_accepted":
        f.send(route, "accepted", acc)
        f.send(route, "accepted", acc)
    elif kind == "bad_finish":
        f.send(route, "accepted", acc)
        f.send(route, "done", {"id": rid, "finish_reason": "bored", "usage": USAGE, "timings": TIMINGS})
    elif kind == "id_type":
        f.send(route, "accepted", dict(acc, id=17))


def test_malformed_replies(fake):
    f = fake(bad)
    with Client(f.endpoint, timeout=5) as c:
        f.state["kind"] = "raw"  # discarded; the good replies behind them still arrive
        assert c.complete(prompt="hi").text == " Paris."
        assert c.malformed == 8
        f.state["kind"] = "raw_only"
        with pytest.raises(DuetError) as e:
            c.generate(prompt="hi", timeout=0.3).result()
        assert e.value.code == "timeout" and "malformed" in e.value.message
        n_cancel = f.count("cancel")
        for kind, stream, says in [("schema", True, "index"), ("early_delta", True, "before 'accepted'"),
                                   ("gap", True, "expected 1"), ("nostream_delta", False, "not streamed"),
                                   ("done_early", True, "before 'accepted'"),
                                   ("bad_usage", True, "prompt_tokens"),
                                   ("two_accepted", True, "second 'accepted'"),
                                   ("bad_finish", True, "finish_reason")]:
            f.state["kind"] = kind
            with pytest.raises(DuetError) as e:
                c.generate(prompt="hi", stream=stream).result()
            assert e.value.code == "bad_reply", kind
            assert says in e.value.message, (kind, e.value.message)
            n_cancel += 1
            f.wait_count("cancel", n_cancel)  # duetd is told to stop it
        f.state["kind"] = "id_type"
        with pytest.raises(DuetError) as e:
            c.generate(prompt="hi", timeout=0.3).result()
        assert e.value.code == "timeout" and "'id'" in e.value.message
        t0 = time.monotonic()
        with pytest.raises(DuetError) as e:
            c.status()
        assert e.value.code == "bad_reply"
        with pytest.raises(DuetError) as e:
            c.health()
        assert e.value.code == "bad_reply" and "bad_json" in e.value.message
        assert time.monotonic() - t0 < 2.0


# ---- status, health ------------------------------------------------------------------------

def test_status_health(fake):
    f = fake(good)
    with Client(f.endpoint, timeout=5) as c:
        assert c.status()["model"] == "SmolLM2 135M Instruct"
        h = c.health()
        assert h["ok"] is True and h["state"] == "ready"
        req = c.generate(prompt="hi")  # replies to a request during status are kept
        assert c.status()["queue"]["limit"] == 1024
        assert req.result().text == " Paris."
    f.state["health"] = dict(HEALTH, ok=False, state="starting")
    with Client(f.endpoint) as c:
        assert c.health()["ok"] is False
