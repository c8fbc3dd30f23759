"""duet_client: a Python client for duetd, a thin layer over the protocol duet.client/1.

docs/PROTOCOL.md in the duet repository is the normative description; this module speaks
it over a ZeroMQ DEALER socket (pyzmq) and adds nothing the protocol does not have::

    from duet_client import Client, DuetError

    with Client("tcp://127.0.0.1:7070") as c:
        for item in c.generate(prompt="The capital of France is", max_tokens=16, temperature=0):
            if item.kind == "delta":
                print(item.text, end="", flush=True)
            else:                      # the last item: the Result
                print("\\n", item.finish_reason, item.usage)

        r = c.complete(messages=[{"role": "user", "content": "Name a prime."}], session="s1")
        print(r.text)
        print(c.health()["ok"], c.status()["queue"])

Several requests may be in flight on one Client; their replies interleave on the socket
and each Request gets its own (iterate them in any order). A Client, like a ZeroMQ
socket, belongs to one thread at a time: use one Client per thread.

Errors raise DuetError(code, message): ``code`` is one of the protocol's stable codes
("busy", "prompt_too_long", "worker_lost", ...; a code this client does not know reads as
"internal" and ``wire_code`` keeps duetd's word), or a client-side one: "timeout" (duetd
said nothing for ``timeout`` seconds), "unreachable" (no connection to send on),
"bad_reply" (duetd's reply broke the protocol). Bad arguments raise TypeError.
"""

import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Iterator, List, Optional, Union

import zmq

__all__ = ["Client", "Request", "Delta", "Result", "Usage", "Timings", "DuetError",
           "DEFAULT_ENDPOINT", "PROTOCOL", "ERROR_CODES"]

PROTOCOL = "duet.client/1"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:7070"  # conf/duet.conf's client_endpoint
ENDPOINT_ENV = "DUET_ENDPOINT"
MAX_MESSAGE = 64 << 20  # ZMQ_MAXMSGSIZE: larger frames drop the connection

# The protocol's stable error codes of duet.client (docs/PROTOCOL.md, "Error codes").
ERROR_CODES = (
    "bad_frames", "unknown_protocol", "unsupported_version", "unknown_command",
    "unexpected_command", "bad_json", "too_large", "bad_request", "duplicate_id",
    "prompt_too_long", "busy", "session_busy", "unavailable", "not_found", "cancelled",
    "shutting_down", "worker_lost", "slow_client", "internal",
)
_REPLIES = ("accepted", "delta", "done", "error", "status", "health")
_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")
_FINISH = ("stop", "length", "eos", "cancelled")
_DEFAULT: Any = object()  # "the Client's timeout"


class DuetError(Exception):
    """An error from duetd or found here. ``code``: the stable code; ``message``: one line
    for people; ``id``: the request it concerns, or None; ``retry_after_ms``: duetd's hint
    for busy/unavailable; ``wire_code``: the code as duetd wrote it."""

    def __init__(self, code: str, message: str, id: Optional[str] = None,
                 retry_after_ms: int = 0, wire_code: Optional[str] = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = id
        self.retry_after_ms = retry_after_ms
        self.wire_code = wire_code or code


@dataclass
class Delta:
    """New text and tokens of a streamed request. ``index`` is the completion position of
    ``token_ids[0]``; deltas are contiguous."""
    id: str
    index: int
    text: str
    token_ids: List[int]
    kind: str = "delta"


@dataclass
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    retries: int


@dataclass
class Timings:
    """Milliseconds from duetd's receipt of the request."""
    queue_ms: float
    ttft_ms: float
    tpot_ms_mean: float
    total_ms: float


@dataclass
class Result:
    """A finished request: the whole text and every token id (streamed or not)."""
    id: str
    text: str
    token_ids: List[int]
    finish_reason: str  # stop, length, eos, cancelled
    usage: Usage
    timings: Timings
    prompt_tokens: int = 0  # from accepted
    max_tokens: int = 0     # the limit in force
    seed: int = -1          # the seed in force
    kind: str = "result"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and v == v


def _check(body: dict, cmd: str, spec: Dict[str, Any]) -> None:
    """Check the fields of a reply body: spec maps a name to a checker or to (checker,
    optional). Unknown fields are ignored, as clients must."""
    for name, chk in spec.items():
        optional = isinstance(chk, tuple)
        if optional:
            chk = chk[0]
        v = body.get(name)
        if v is None:
            if optional:
                continue
            raise ValueError(f"{cmd}: field '{name}' is missing")
        if not chk(v):
            raise ValueError(f"{cmd}: field '{name}' has a bad value ({json.dumps(v)[:60]})")


def _ids_ok(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(t) and 0 <= t <= 2**31 - 1 for t in v)


def _nonneg_int(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _nonneg_num(v: Any) -> bool:
    return _is_num(v) and v >= 0


_ID = lambda v: isinstance(v, str) and 1 <= len(v.encode()) <= 64  # noqa: E731
_SPECS = {
    "accepted": {"id": _ID, "prompt_tokens": _nonneg_int, "max_tokens": _nonneg_int,
                 "seed": _nonneg_int},
    "delta": {"id": _ID, "index": _nonneg_int, "text": lambda v: isinstance(v, str),
              "token_ids": _ids_ok},
    "done": {"id": _ID, "finish_reason": lambda v: v in _FINISH,
             "text": (lambda v: isinstance(v, str),), "token_ids": (_ids_ok,),
             "usage": lambda v: isinstance(v, dict), "timings": lambda v: isinstance(v, dict)},
    "error": {"id": (_ID,), "code": lambda v: isinstance(v, str),
              "message": lambda v: isinstance(v, str), "command": (lambda v: isinstance(v, str),),
              "retry_after_ms": (_nonneg_int,)},
    "health": {"ok": lambda v: isinstance(v, bool), "state": lambda v: isinstance(v, str),
               "groups_ready": _nonneg_int, "workers_alive": _nonneg_int,
               "uptime_s": _nonneg_num},
    "status": {"version": lambda v: isinstance(v, str), "uptime_s": _nonneg_num,
               "groups": lambda v: isinstance(v, list), "workers": lambda v: isinstance(v, list),
               "kv": lambda v: isinstance(v, dict), "queue": lambda v: isinstance(v, dict)},
}
_USAGE = {k: _nonneg_int for k in ("prompt_tokens", "cached_prompt_tokens",
                                   "completion_tokens", "retries")}
_TIMINGS = {k: _nonneg_num for k in ("queue_ms", "ttft_ms", "tpot_ms_mean", "total_ms")}


def _no_dup_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key '{k}'")
        d[k] = v
    return d


class Request:
    """One generate request: iterate it for its Deltas (streaming) and then its Result.
    Iteration raises DuetError when the request fails (after the deltas that came)."""

    def __init__(self, client: "Client", id: str, stream: bool, timeout: Optional[float]):
        self._client = client
        self.id = id
        self.stream = stream
        self.timeout = timeout
        self.accepted: Optional[dict] = None  # {"prompt_tokens", "max_tokens", "seed"}
        self.done = False                     # the last reply (done or error) arrived
        self.error: Optional[DuetError] = None
        self._result: Optional[Result] = None
        self._queue: Deque[Union[Delta, Result, DuetError]] = deque()
        self._text: List[str] = []
        self._ids: List[int] = []
        self._cancel_sent = False
        self._ended = False  # the last item was handed out

    def __iter__(self) -> Iterator[Union[Delta, Result]]:
        return self

    def __next__(self) -> Union[Delta, Result]:
        if not self._queue:
            if self._ended or (self.done and not self._queue):
                raise StopIteration
            self._client._wait(lambda: bool(self._queue), self.timeout, f"request '{self.id}'")
        item = self._queue.popleft()
        if isinstance(item, DuetError):
            self._ended = True
            raise item
        if isinstance(item, Result):
            self._ended = True
        return item

    def result(self, timeout: Optional[float] = None) -> Result:
        """Wait for the end (at most ``timeout`` seconds of silence; default: the request's)
        and return the Result, or raise its DuetError. Undelivered deltas are dropped."""
        if not self.done:
            self._client._wait(lambda: self.done, self.timeout if timeout is None else timeout,
                               f"request '{self.id}'")
        self._queue.clear()
        self._ended = True
        if self.error:
            raise self.error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Ask duetd to end the request; it then ends with finish_reason 'cancelled'.
        Returns at once; idempotent; a no-op once it is done."""
        if self.done or self._cancel_sent:
            return
        self._client._send("cancel", {"id": self.id})
        self._cancel_sent = True

    # -- replies (called by the Client) --------------------------------------------------

    def _fail(self, err: DuetError) -> None:
        self.done = True
        self.error = err
        self._queue.append(err)

    def _bad(self, what: str) -> None:
        self._client._send_quietly("cancel", {"id": self.id})
        self._cancel_sent = True
        self._fail(DuetError("bad_reply", f"duetd {what} for request '{self.id}'", self.id))

    def _on(self, cmd: str, b: dict) -> None:
        if cmd == "accepted":
            if self.accepted is not None:
                return self._bad("sent a second 'accepted'")
            self.accepted = {k: b[k] for k in ("prompt_tokens", "max_tokens", "seed")}
        elif cmd == "delta":
            if not self.stream:
                return self._bad("sent a 'delta' for a request that is not streamed")
            if self.accepted is None:
                return self._bad("sent a 'delta' before 'accepted'")
            if b["index"] != len(self._ids):
                return self._bad(f"sent a 'delta' at index {b['index']}; expected "
                                 f"{len(self._ids)} (deltas are contiguous)")
            self._text.append(b["text"])
            self._ids.extend(b["token_ids"])
            self._queue.append(Delta(self.id, b["index"], b["text"], list(b["token_ids"])))
        elif cmd == "done":
            if self.accepted is None:
                return self._bad("sent 'done' before 'accepted'")
            try:
                _check(b["usage"], "done.usage", _USAGE)
                _check(b["timings"], "done.timings", _TIMINGS)
            except ValueError as e:
                return self._bad(f"sent a 'done' that breaks the protocol ({e})")
            if not self.stream:
                self._text = [b.get("text") or ""]
                self._ids = list(b.get("token_ids") or [])
            u, t = b["usage"], b["timings"]
            self._result = Result(
                id=self.id, text="".join(self._text), token_ids=self._ids,
                finish_reason=b["finish_reason"],
                usage=Usage(*(u[k] for k in _USAGE)), timings=Timings(*(t[k] for k in _TIMINGS)),
                prompt_tokens=self.accepted["prompt_tokens"],
                max_tokens=self.accepted["max_tokens"], seed=self.accepted["seed"])
            self.done = True
            self._queue.append(self._result)
        elif cmd == "error":
            self._fail(_error_of(b))


def _error_of(b: dict) -> DuetError:
    wire = b["code"]
    return DuetError(wire if wire in ERROR_CODES else "internal", b["message"], b.get("id"),
                     b.get("retry_after_ms") or 0, wire)


class Client:
    """One connection to duetd's client endpoint.

    endpoint: "tcp://HOST:PORT" (default: $DUET_ENDPOINT, else tcp://127.0.0.1:7070);
    timeout: seconds a request may stay silent before DuetError("timeout") (None: no
    limit); send_timeout: seconds a send waits for the connection (then "unreachable")."""

    def __init__(self, endpoint: Optional[str] = None, timeout: Optional[float] = 300.0,
                 send_timeout: float = 5.0, heartbeat_ms: int = 0):
        self.endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
        self.timeout = timeout
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        s = self._sock
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        s.setsockopt(zmq.SNDTIMEO, int(send_timeout * 1000))
        s.setsockopt(zmq.IMMEDIATE, 1)
        if heartbeat_ms > 0:
            s.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
            s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 4 * heartbeat_ms)
        try:
            s.connect(self.endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise TypeError(f"cannot connect to '{self.endpoint}': {e}") from None
        self._poller = zmq.Poller()
        self._poller.register(s, zmq.POLLIN)
        self._requests: Dict[str, Request] = {}  # in flight, by id
        self._next_id = 0
        self._waiting: Dict[str, Any] = {}      # "status"/"health" -> reply dict or DuetError
        self.malformed = 0                       # replies discarded: they named no request
        self.last_malformed = ""

    # -- life ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; requests in flight are abandoned (duetd cancels them)."""
        if getattr(self, "_sock", None) is not None:
            self._sock.close(0)
            self._sock = None
        if getattr(self, "_ctx", None) is not None:
            self._ctx.term()
            self._ctx = None
        for r in list(getattr(self, "_requests", {}).values()):
            if not r.done:
                r._fail(DuetError("usage", "the connection was closed", r.id))
        self._requests = {}

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------

    def generate(self, prompt: Optional[str] = None, *, messages: Optional[List[dict]] = None,
                 token_ids: Optional[List[int]] = None, stream: bool = True,
                 max_tokens: Optional[int] = None, stop: Optional[List[str]] = None,
                 stop_token_ids: Optional[List[int]] = None, ignore_eos: bool = False,
                 session: Optional[str] = None, id: Optional[str] = None,
                 timeout: Optional[float] = _DEFAULT, **sampling: Any) -> Request:
        """Send `generate` and return its Request at once. Exactly one of prompt (text),
        messages ([{"role", "content"}]) and token_ids. sampling: temperature, top_k,
        top_p, min_p, repeat_penalty, repeat_last_n, seed (absent: the protocol's
        defaults). With stream=False the Request yields only the Result. timeout: seconds
        of silence before DuetError("timeout") while waiting on it (default: the Client's)."""
        bad = [k for k in sampling if k not in _SAMPLING]
        if bad:
            raise TypeError(f"generate() got unknown argument(s) {', '.join(bad)} "
                            f"(sampling takes: {', '.join(_SAMPLING)})")
        forms = [n for n, v in (("prompt", prompt), ("messages", messages),
                                ("token_ids", token_ids)) if v is not None]
        if len(forms) != 1:
            raise TypeError("generate() takes exactly one of prompt, messages, token_ids "
                            f"(got {', '.join(forms) or 'none'})")
        if id is None:
            while True:
                self._next_id += 1
                id = f"r{self._next_id}"
                if id not in self._requests:
                    break
        elif id in self._requests:
            raise DuetError("duplicate_id", f"generate: request '{id}' is already in flight "
                            "on this connection", id)
        body: Dict[str, Any] = {"id": id}
        if prompt is not None:
            body["prompt"] = prompt
        if messages is not None:
            body["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
        if token_ids is not None:
            body["tokens"] = list(token_ids)
        smp = {k: v for k, v in sampling.items() if v is not None}
        if smp:
            body["sampling"] = smp
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if stop:
            body["stop"] = list(stop)
        if stop_token_ids:
            body["stop_token_ids"] = list(stop_token_ids)
        if ignore_eos:
            body["ignore_eos"] = True
        if stream:
            body["stream"] = True
        if session is not None:
            body["session"] = session
        r = Request(self, id, bool(stream), self.timeout if timeout is _DEFAULT else timeout)
        self._send("generate", body)
        self._requests[id] = r
        return r

    def complete(self, prompt: Optional[str] = None, **kw: Any) -> Result:
        """generate(..., stream=False) and wait for its Result."""
        kw["stream"] = False
        return self.generate(prompt, **kw).result()

    def cancel(self, id: str) -> None:
        """Cancel the request ``id`` of this connection (see Request.cancel)."""
        r = self._requests.get(id)
        if r is not None:
            r.cancel()
        else:
            self._send("cancel", {"id": id})

    def status(self, timeout: float = 5.0) -> dict:
        """The cluster's state (docs/PROTOCOL.md, `status`) as a dict."""
        return self._ask("status", timeout)

    def health(self, timeout: float = 5.0) -> dict:
        """{"ok", "state", "groups_ready", "workers_alive", "uptime_s"}; ok is True when
        generate requests can be served now."""
        return self._ask("health", timeout)

    def poll(self, timeout: Optional[float] = 0.0) -> int:
        """Receive and sort the replies that arrive within ``timeout`` seconds (None: wait
        for one); returns how many were handled."""
        n = 0
        t = None if timeout is None else int(timeout * 1000)
        while self._pump(t):
            n += 1
            t = 0
        return n

    # -- internals -------------------------------------------------------------------------

    def _send(self, cmd: str, body: dict) -> None:
        if self._sock is None:
            raise DuetError("usage", "the client is closed")
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode()
        try:
            self._sock.send_multipart([PROTOCOL.encode(), cmd.encode(), data])
        except zmq.Again:
            raise DuetError("unreachable", f"{cmd}: no connection to duetd at "
                            f"{self.endpoint} (send timed out)") from None

    def _send_quietly(self, cmd: str, body: dict) -> None:
        try:
            if self._sock is not None:
                self._sock.send_multipart([PROTOCOL.encode(), cmd.encode(),
                                           json.dumps(body).encode()], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _ask(self, cmd: str, timeout: Optional[float]) -> dict:
        self._waiting.pop(cmd, None)
        self._send(cmd, {})
        self._waiting[cmd] = None
        try:
            self._wait(lambda: self._waiting.get(cmd) is not None, timeout, cmd)
            got = self._waiting[cmd]
        finally:
            self._waiting.pop(cmd, None)
        if isinstance(got, DuetError):
            raise got
        return got

    def _wait(self, cond, timeout: Optional[float], what: str) -> None:
        """Pump until cond() holds; DuetError('timeout') after ``timeout`` seconds of
        waiting (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bad0 = self.malformed
        while not cond():
            if self._sock is None:
                raise DuetError("usage", "the client is closed")
            left = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not self._pump(left) and deadline is not None and time.monotonic() >= deadline:
                if cond():
                    return
                extra = ""
                if self.malformed > bad0:
                    extra = (f" ({self.malformed - bad0} malformed messages discarded meanwhile; "
                             f"the last: {self.last_malformed})")
                raise DuetError("timeout", f"{what}: no reply from duetd at {self.endpoint} "
                                f"within {timeout:g} s{extra}")

    def _malformed(self, what: str) -> None:
        self.malformed += 1
        self.last_malformed = what

    def _pump(self, timeout_ms: Optional[int]) -> bool:
        """Receive one message (waiting at most timeout_ms; None: without limit) and
        sort it. False when nothing arrived."""
        if not self._poller.poll(timeout_ms):
            return False
        try:
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return False
        if len(frames) != 3:
            self._malformed(f"bad_frames: expected 3 frames, got {len(frames)}")
            return True
        tag, cmd_b, data = frames
        if tag != PROTOCOL.encode():
            self._malformed(f"frame 0: {tag[:40]!r} is not {PROTOCOL}")
            return True
        cmd = cmd_b.decode("ascii", "replace")
        if cmd not in _REPLIES:
            self._malformed(f"frame 1: '{cmd[:32]}' is no reply of {PROTOCOL}")
            return True
        try:
            body = json.loads(data.decode("utf-8"), object_pairs_hook=_no_dup_keys)
            if not isinstance(body, dict):
                raise ValueError(f"the body must be a JSON object, not {type(body).__name__}")
        except (ValueError, UnicodeDecodeError) as e:
            if cmd in ("status", "health") and cmd in self._waiting:
                self._waiting[cmd] = DuetError("bad_reply", f"duetd's '{cmd}' reply: bad_json: {e}")
            else:
                self._malformed(f"bad_json in '{cmd}': {e}")
            return True
        try:
            _check(body, cmd, _SPECS[cmd])
        except ValueError as e:
            rid = body.get("id")
            r = self._requests.get(rid) if isinstance(rid, str) else None
            if cmd in ("status", "health") and cmd in self._waiting:
                self._waiting[cmd] = DuetError("bad_reply", f"duetd's reply breaks the protocol: {e}")
            elif r is not None and not r.done:
                r._bad(f"sent a '{cmd}' that breaks the protocol ({e})")
                self._forget(r)
            else:
                self._malformed(f"{e}")
            return True
        if cmd in ("status", "health"):
            if cmd in self._waiting and self._waiting[cmd] is None:
                self._waiting[cmd] = body
            return True
        rid = body.get("id")
        if cmd == "error" and rid is None:
            c = body.get("command")
            if c in ("status", "health") and c in self._waiting and self._waiting[c] is None:
                self._waiting[c] = _error_of(body)
            else:
                self._malformed(f"error '{body['code']}' naming no request: {body['message']}")
            return True
        r = self._requests.get(rid)
        if r is None or r.done:
            return True  # a request we forgot, or a not_found that crossed its done
        if cmd == "error" and body.get("command") == "cancel" and not r._cancel_sent:
            return True  # the late answer to a cancel of an earlier request with this id
        r._on(cmd, body)
        if r.done:
            self._forget(r)
        return True

    def _forget(self, r: Request) -> None:
        if self._requests.get(r.id) is r:
            del self._requests[r.id]
