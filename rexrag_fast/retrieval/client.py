"""HTTP client for a Search-R1-compatible retrieval server (ours, or Search-R1's retrieval_server.py).

Retries connection failures, timeouts and 5xx/429 answers with exponential backoff,
    delay_i = min(backoff * 2^i, max_backoff),  i = 0 .. retries-1,
and then raises RetrievalUnavailableError naming the URL and the last error. A 4xx answer other than 429 is the
caller's mistake: it raises RetrievalRequestError with the server's message at once, without retrying.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from rexrag_fast.retrieval.local import check_queries


class RetrievalError(RuntimeError):
    """Base class of retrieval client errors."""


class RetrievalUnavailableError(RetrievalError):
    """The server could not be reached or kept failing after all retries."""


class RetrievalRequestError(RetrievalError):
    """The server refused the request (4xx); `status` and the server's `detail` are kept."""

    def __init__(self, status: int, detail: str, url: str) -> None:
        super().__init__(f"retrieval server {url} refused the request ({status}): {detail}")
        self.status = status
        self.detail = detail


class RetrievalClient:
    """`retrieve(queries, topk, return_scores)` against `url` (the full /retrieve URL, as Search-R1's search_url).

    timeout: seconds per HTTP attempt. retries: extra attempts after the first. batch_size: queries per request
    (long lists are split and the answers concatenated, so the server's per-request limit is never hit).
    """

    def __init__(self, url: str = "http://127.0.0.1:8000/retrieve", timeout: float = 10.0, retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 8.0, batch_size: int = 512) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url must be an http(s) URL such as http://127.0.0.1:8000/retrieve, got {url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0 or batch_size < 1:
            raise ValueError(f"need timeout > 0, retries >= 0, backoff >= 0, batch_size >= 1; got timeout={timeout}, "
                             f"retries={retries}, backoff={backoff}, batch_size={batch_size}")
        self.url = url if parts.path not in ("", "/") else urlunsplit(parts._replace(path="/retrieve"))
        self.health_url = urlunsplit(urlsplit(self.url)._replace(path="/health", query=""))
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.batch_size = batch_size
        self._http = httpx.Client(timeout=timeout)

    def retrieve(self, queries: list[str], topk: int = 3, return_scores: bool = True) -> list[list[dict[str, Any]]]:
        """[Q] queries -> per query, the server's top-k list: [{"document": {"id", "contents"}, "score"}, ...]
        (return_scores=True) or [{"id", "contents"}, ...]."""
        check_queries(queries, topk)
        out: list[list[dict[str, Any]]] = []
        for start in range(0, len(queries), self.batch_size):
            part = queries[start:start + self.batch_size]
            answer = self._post({"queries": part, "topk": topk, "return_scores": return_scores})
            result = answer.get("result") if isinstance(answer, dict) else None
            if not isinstance(result, list) or len(result) != len(part):
                raise RetrievalError(f"retrieval server {self.url} answered {len(part)} queries with an unexpected "
                                     f"body: {str(answer)[:200]}")
            out.extend(result)
        return out

    def health(self) -> dict[str, Any]:
        """GET /health of the server (with the same retries)."""
        return self._request("GET", self.health_url, None)

    def _post(self, payload: dict[str, Any]) -> Any:
        return self._request("POST", self.url, payload)

    def _request(self, method: str, url: str, payload: dict[str, Any] | None) -> Any:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            try:
                resp = self._http.request(method, url, json=payload)
            except httpx.TimeoutException as e:
                last = f"timed out after {self.timeout}s ({type(e).__name__})"
                continue
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {_detail(resp)}"
                continue
            if resp.status_code >= 400:
                raise RetrievalRequestError(resp.status_code, _detail(resp), url)
            try:
                return resp.json()
            except ValueError:
                raise RetrievalError(f"retrieval server {url} answered with non-JSON: {resp.text[:200]!r}") from None
        raise RetrievalUnavailableError(
            f"retrieval server {url} unavailable after {self.retries + 1} attempts (last error: {last}); is it "
            f"running? Start one with `rexrag-fast serve --index DIR --port {urlsplit(url).port or 80}`")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RetrievalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])
    except ValueError:
        pass
    return resp.text[:200]
