"""Load on python -m serve (32 clients x 4 requests on loopback, the demo model): every request is
answered or refused with 429/503, none is lost, and every batched answer equals the answer the
same query gets alone. Speed is measured by `python -m serve.loadtest`, not asserted here."""

from serve.loadtest import run
from serve.process import ServerProcess


def test_many_clients_get_whole_answers_or_a_refusal():
    # A small batch and queue, so that some of the 32 clients meet a full queue.
    with ServerProcess("--threads", "1", "--max-batch-size", "8", "--max-waiting", "12") as server:
        sequential, concurrent = run(
            server.url,
            model="tiny-chatglm2",
            api_key=None,
            clients=32,
            requests_per_client=4,
            sequential_requests=8,
            max_tokens=64,
            query_count=8,
        )
        assert server.health()["running_rows"] == 0
    assert sequential["answered"] == 8
    assert concurrent["requests"] == 128
    assert concurrent["lost"] == 0 and concurrent["wrong"] == 0, concurrent
    assert concurrent["answered"] + concurrent["refused"] == 128 and concurrent["answered"] > 0
    assert "Traceback" not in server.log
