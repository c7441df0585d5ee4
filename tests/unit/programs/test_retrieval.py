"""Retrievers: BM25 over the fixture corpus, the ColBERTv2 client against a real local server, specs."""

import copy
import json
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from programs.retrieval import (BM25Retriever, ColBERTv2Retriever, RetrievalError, Retriever,
                                make_retriever)

CORPUS = Path(__file__).parents[2] / "fixtures" / "hotpotqa" / "corpus.jsonl"


@pytest.fixture(scope="module")
def bm25():
    return BM25Retriever(CORPUS)


@pytest.mark.parametrize("query, title", [
    ("Who designed Marlow Bridge?", "Marlow Bridge"),
    ("Where was Ada Fenwick born?", "Ada Fenwick"),
    ("Which river feeds Lake Orvana?", "Lake Orvana"),
    ("Who founded the Hallam Yard shipyard?", "Hallam Yard"),
    ("What instrument does Mira Castell play", "Mira Castell"),
])
def test_bm25_ranks_the_right_passage_first(bm25, query, title):
    passages = bm25(query, 3)
    assert len(passages) == 3 and len(set(passages)) == 3
    assert passages[0].startswith(f"{title} | ")


def test_bm25_passages_are_title_bar_text_and_k_is_capped(bm25):
    first = json.loads(CORPUS.read_text().splitlines()[0])
    assert f"{first['title']} | {first['text']}" in bm25(first["text"], 1)
    assert len(bm25("bridge", 1000)) == 30  # k beyond the corpus: the whole corpus
    with pytest.raises(ValueError, match="k must be"):
        bm25("bridge", 0)


def test_bm25_is_a_retriever_shared_by_deep_copies_and_pickles(bm25):
    assert isinstance(bm25, Retriever)
    assert copy.deepcopy({"r": bm25})["r"] is bm25
    shipped = pickle.loads(pickle.dumps(bm25))  # as Ray ships a program to its actors
    assert shipped is not bm25 and shipped("Where was Ada Fenwick born?", 3) == bm25("Where was Ada Fenwick born?", 3)


@pytest.mark.parametrize("bad, message", [
    ('{"id": "1", "title": "A"', "not valid JSON"),
    ('{"id": "1", "title": "A"}', "'title' and 'text'"),
    ('["A", "text"]', "'title' and 'text'"),
])
def test_bm25_names_file_and_line_of_a_malformed_passage(tmp_path, bad, message):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "0", "title": "T", "text": "fine"}) + "\n\n" + bad + "\n")
    with pytest.raises(ValueError, match=rf"corpus\.jsonl:3: .*{message}"):
        BM25Retriever(corpus)


def test_bm25_refuses_an_empty_or_missing_corpus(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        BM25Retriever(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        BM25Retriever(tmp_path / "nope.jsonl")


class _ColBERT(BaseHTTPRequestHandler):
    """The ColBERTv2 GET API: ``?query=...&k=...`` -> ``{"topk": [...]}``; some queries misbehave."""

    requests: list[dict] = []

    def do_GET(self):  # noqa: N802 - the http.server hook
        params = {key: values[0] for key, values in parse_qs(urlparse(self.path).query).items()}
        type(self).requests.append({"path": urlparse(self.path).path, **params})
        query, k = params.get("query", ""), int(params.get("k", "0"))
        if query == "boom":
            return self._send(500, b"index exploded")
        if query == "slow":
            time.sleep(1.0)
        body = {"topk": [{"text": f"Title {i} | passage {i} for {query}", "pid": i, "score": 10.0 - i}
                         for i in range(k + 2)]} if query != "odd" else {"results": []}
        self._send(200, json.dumps(body).encode())

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def colbert_url(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    _ColBERT.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ColBERT)
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/search"
    server.shutdown()
    server.server_close()


def test_colbertv2_sends_query_and_k_and_returns_passages(colbert_url):
    passages = ColBERTv2Retriever(colbert_url)("Marlow Bridge & designer?", 3)
    assert _ColBERT.requests == [{"path": "/api/search", "query": "Marlow Bridge & designer?", "k": "3"}]
    assert passages == [f"Title {i} | passage {i} for Marlow Bridge & designer?" for i in range(3)]


def test_colbertv2_http_error_names_status_and_url(colbert_url):
    with pytest.raises(RetrievalError, match=r"HTTP 500 .*127\.0\.0\.1.*/api/search\?query=boom.*index exploded"):
        ColBERTv2Retriever(colbert_url)("boom", 2)


def test_colbertv2_unexpected_body_and_timeout(colbert_url):
    with pytest.raises(RetrievalError, match="without a 'topk'"):
        ColBERTv2Retriever(colbert_url)("odd", 2)
    with pytest.raises(RetrievalError, match="did not answer within 0.2s"):
        ColBERTv2Retriever(colbert_url, timeout=0.2)("slow", 2)


def test_colbertv2_unreachable_server_names_url(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/search"
    with pytest.raises(RetrievalError, match=f"{url} is unreachable"):
        ColBERTv2Retriever(url, timeout=2)("q", 1)


def test_make_retriever_forms(tmp_path):
    bm25 = make_retriever(f"bm25:{CORPUS}")
    assert isinstance(bm25, BM25Retriever) and bm25.corpus_path == CORPUS
    colbert = make_retriever("https://example.org:2017/wiki17_abstracts")
    assert isinstance(colbert, ColBERTv2Retriever) and colbert.url == "https://example.org:2017/wiki17_abstracts"
    for bad in ("colbert:http://x", str(CORPUS), "bm25:", "ftp://host/x", None):
        with pytest.raises(ValueError, match="bm25:/path/to/corpus.jsonl.*http"):
            make_retriever(bad)
