"""Passage retrievers for the multi-hop program, behind one call: ``retriever(query, k)``.

A retriever returns the ``k`` best passages for a query as ``"title | text"`` strings, best first:

- ``BM25Retriever(corpus_path)``: BM25 (the ``bm25s`` library) over a local JSONL corpus, one
  ``{"id": ..., "title": ..., "text": ...}`` per line, indexed once when built;
- ``ColBERTv2Retriever(url)``: a client of a ColBERTv2 server (the API ``dspy.ColBERTv2`` speaks:
  ``GET url?query=...&k=...`` answers ``{"topk": [{"text": ..., "pid": ..., "score": ...}]}``; the
  server's ``text`` is used as is, the wiki-abstracts servers already write ``"title | text"``).

``make_retriever(spec)`` builds one from a string (``"bm25:/path/corpus.jsonl"`` or an
``http(s)://`` URL) so that run configs can record the choice as JSON. Retrievers hold no
per-call state: ``copy.deepcopy`` returns the same object, so the copies of a program that
optimizers make share one index. Knows HTTP and bm25s; does not know DSPy programs or LMs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import requests

from programs.base import jsonl_rows

logger = logging.getLogger(__name__)

SPEC_FORMS = "'bm25:/path/to/corpus.jsonl' (a local JSONL corpus) or 'http(s)://host:port/...' (a ColBERTv2 server)"


class RetrievalError(RuntimeError):
    """A retrieval server failed or answered something other than the ColBERTv2 API."""


@runtime_checkable
class Retriever(Protocol):
    """Anything that maps ``(query, k)`` to up to ``k`` passages ``"title | text"``, best first."""

    def __call__(self, query: str, k: int) -> list[str]: ...


class _Shared:
    """Retrievers are immutable: deep copies of a program share them instead of copying an index."""

    def __deepcopy__(self, memo: dict) -> "_Shared":
        return self


class BM25Retriever(_Shared):
    """BM25 over a local JSONL passage corpus, with English stopwords removed.

    Args:
        corpus_path: a JSONL file, one ``{"id", "title", "text"}`` object per line (``id``
            optional; blank lines skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line (file and line named) or an empty corpus.
        ImportError: ``bm25s`` is not installed.

    Example:
        >>> BM25Retriever("tests/fixtures/hotpotqa/corpus.jsonl")("Who designed Marlow Bridge?", 1)
        ['Marlow Bridge | Marlow Bridge is a stone suspension bridge over the river Tessel. ...']
    """

    def __init__(self, corpus_path: str | Path) -> None:
        try:
            import bm25s
        except ImportError:
            raise ImportError("BM25Retriever needs the bm25s package: pip install bm25s==0.3.16") from None
        self.corpus_path = Path(corpus_path).expanduser()
        self.passages = read_corpus(self.corpus_path)
        self._index = bm25s.BM25()
        self._index.index(self._tokenize(self.passages), show_progress=False)
        logger.info("indexed %d passages of %s with BM25", len(self.passages), self.corpus_path)

    def __call__(self, query: str, k: int) -> list[str]:
        """The ``min(k, corpus size)`` passages that score best for ``query``."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(self.passages))
        ids, _ = self._index.retrieve(self._tokenize([query]), k=k, show_progress=False)
        return [self.passages[int(i)] for i in ids[0]]

    @staticmethod
    def _tokenize(texts: list[str]) -> list[list[str]]:
        import bm25s  # not kept on self: the retriever must pickle (Ray ships programs)

        # "en": bm25s's bundled English stopword list (no download)
        return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)

    def __repr__(self) -> str:
        return f"BM25Retriever({str(self.corpus_path)!r})"


def read_corpus(path: Path) -> list[str]:
    """The passages of a JSONL corpus as ``"title | text"`` strings, in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not an object with string ``title`` and ``text``, or no passages.
    """
    if not path.is_file():
        raise FileNotFoundError(f"passage corpus {path} does not exist (JSONL of {{id, title, text}})")
    passages = []
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in ("title", "text")):
            raise ValueError(f"{where}: a passage is an object with string 'title' and 'text'")
        passages.append(f"{row['title'].strip()} | {row['text'].strip()}")
    if not passages:
        raise ValueError(f"passage corpus {path} is empty")
    return passages


class ColBERTv2Retriever(_Shared):
    """A client of a ColBERTv2 retrieval server (GET API).

    Args:
        url: the server's search endpoint, e.g. ``http://127.0.0.1:8893/api/search``.
        timeout: seconds to wait for each answer.

    Example:
        ``ColBERTv2Retriever("http://127.0.0.1:8893/api/search", timeout=30)("Marlow Bridge", 3)``
        asks that server for 3 passages and returns their ``text``.
    """

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.url = url
        self.timeout = timeout

    def __call__(self, query: str, k: int) -> list[str]:
        """The server's top ``k`` passages for ``query``.

        Raises:
            RetrievalError: the server is unreachable, too slow, answers an HTTP error (status and
                URL named) or a body without ``topk``.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        try:
            response = requests.get(self.url, params={"query": query, "k": k}, timeout=self.timeout)
        except requests.Timeout:
            raise RetrievalError(f"ColBERTv2 server {self.url} did not answer within {self.timeout}s") from None
        except requests.RequestException as exc:
            raise RetrievalError(f"ColBERTv2 server {self.url} is unreachable: {exc}") from None
        if not response.ok:
            raise RetrievalError(f"ColBERTv2 server answered HTTP {response.status_code} "
                                 f"{response.reason} for {response.url}: {response.text[:200]}")
        return _passages(response, self.url)[:k]

    def __repr__(self) -> str:
        return f"ColBERTv2Retriever({self.url!r})"


def _passages(response: requests.Response, url: str) -> list[str]:
    try:
        body: Any = response.json()
    except ValueError:
        raise RetrievalError(f"ColBERTv2 server {url} answered non-JSON: {response.text[:200]!r}") from None
    if not isinstance(body, dict) or body.get("error"):
        message = body.get("message", body) if isinstance(body, dict) else body
        raise RetrievalError(f"ColBERTv2 server {url} answered an error: {message}")
    topk = body.get("topk")
    if not isinstance(topk, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in topk):
        raise RetrievalError(f"ColBERTv2 server {url} answered without a 'topk' list of passages "
                             f"with 'text': {str(body)[:200]}")
    return [p["text"] for p in topk]


def make_retriever(spec: str) -> Retriever:
    """The retriever a spec string names.

    Args:
        spec: ``"bm25:/path/corpus.jsonl"`` or a ColBERTv2 server URL ``http(s)://...``.

    Raises:
        ValueError: any other form (the accepted ones are named).

    Example:
        >>> make_retriever("bm25:tests/fixtures/hotpotqa/corpus.jsonl")
        BM25Retriever('tests/fixtures/hotpotqa/corpus.jsonl')
    """
    if not isinstance(spec, str):
        raise ValueError(f"a retriever spec is a string, {SPEC_FORMS}; got {spec!r}")
    if spec.startswith("bm25:") and spec[len("bm25:"):].strip():
        return BM25Retriever(spec[len("bm25:"):].strip())
    if spec.startswith(("http://", "https://")):
        return ColBERTv2Retriever(spec)
    raise ValueError(f"unknown retriever spec {spec!r}: use {SPEC_FORMS}")
