"""Search requests are checked field by field, and replies fit the size limit whatever they hold."""

import json

import pytest

from pipeline.matching.search import MAX_TOP_K, BadSearchRequest, SearchRequest, encode_reply


def test_a_request_round_trips():
    request = SearchRequest("r1", "a red circle", None, 10.0, 20.0, 5)
    assert SearchRequest.decode(request.encode()) == request
    assert SearchRequest.decode(SearchRequest("r2", code=bytes(16)).encode()).code == bytes(16)


@pytest.mark.parametrize("value, message, request_id", [
    (b"\xff", "UTF-8 JSON", None),
    (b"[1]", "JSON object", None),
    (None, "JSON object", None),
    (json.dumps({"request_id": "r", "code": "00", "top_k": 100_000}).encode(), "from 1 to 1000", "r"),
    (json.dumps({"request_id": "r", "code": "00", "top_k": True}).encode(), "top_k", "r"),
    (json.dumps({"request_id": "r", "text": "  "}).encode(), "non-empty text", "r"),
    (json.dumps({"request_id": "r", "code": "zz"}).encode(), "hex", "r"),
    (json.dumps({"request_id": "r", "code": "00", "since": "yesterday"}).encode(), "since", "r"),
    (json.dumps({"request_id": "r", "text": "x" * 1001}).encode(), "1000 characters", "r"),
    (json.dumps({"request_id": "x" * 129, "code": "00"}).encode(), "request_id", None),
    (b'{"request_id": "\\ud800", "code": "00"}', "request_id", None),
])
def test_bad_requests_say_why(value, message, request_id):
    with pytest.raises(BadSearchRequest, match=message) as caught:
        SearchRequest.decode(value)
    assert caught.value.request_id == request_id


def test_replies_are_cut_to_the_size_limit():
    hits = [{"stream_id": "s" * 100, "start": i, "end": i + 1, "distance": 0, "capture_time": 1.0, "partition": 0}
            for i in range(MAX_TOP_K)]
    data = encode_reply("r", hits, [0, 1], None, 20_000)
    reply = json.loads(data)
    assert len(data) <= 20_000 and reply["truncated"] and 0 < len(reply["hits"]) < MAX_TOP_K
    assert reply["hits"] == hits[:len(reply["hits"])]  # the best ones, in order
    assert len(json.loads(encode_reply("r", [], [0], "e" * 10**6, 20_000))["error"]) == 1000
    assert not json.loads(encode_reply("r", hits[:3], [0], None, 20_000))["truncated"]
