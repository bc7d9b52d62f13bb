"""The coalescer's barrier logic, with a fake backend (logic only)."""

import asyncio


from itscale.strategies.batching import Coalescer


class Echo:
    def __init__(self):
        self.calls = []

    async def __call__(self, items):
        self.calls.append(list(items))
        await asyncio.sleep(0)
        return [f"r{x}" for x in items]


def run_workers(n_workers, rounds, pause=None):
    async def main():
        c, echo = Coalescer(), Echo()

        async def worker(w):
            async with c.member():
                out = []
                for r in range(rounds(w) if callable(rounds) else rounds):
                    if pause and w == 0:
                        await asyncio.sleep(pause)  # not a coalesced call
                    out += await c.submit("policy", echo, [f"{w}.{r}.a", f"{w}.{r}.b"])
                return out

        results = await asyncio.gather(*(worker(w) for w in range(n_workers)))
        return c, echo, results

    return asyncio.run(main())


def test_one_backend_call_per_round_for_all_workers():
    c, echo, results = run_workers(8, 3)
    assert len(echo.calls) == 3 and all(len(call) == 16 for call in echo.calls)
    assert results[5] == ["r5.0.a", "r5.0.b", "r5.1.a", "r5.1.b", "r5.2.a", "r5.2.b"]


def test_workers_that_finish_early_leave_the_barrier():
    c, echo, results = run_workers(4, lambda w: w + 1)
    assert [len(call) for call in echo.calls] == [8, 6, 4, 2]
    assert len(results[3]) == 8


def test_a_worker_awaiting_other_io_does_not_deadlock_the_batch():
    c, echo, results = run_workers(3, 2, pause=0.01)
    assert all(len(r) == 4 for r in results)
    assert len(echo.calls) <= 4


def test_backend_failure_reaches_every_waiting_worker():
    async def main():
        c = Coalescer()

        async def boom(items):
            raise ConnectionError("backend down")

        async def worker():
            async with c.member():
                return await c.submit("prm", boom, [1])

        return await asyncio.gather(*(worker() for _ in range(3)), return_exceptions=True)

    out = asyncio.run(main())
    assert all(isinstance(e, ConnectionError) for e in out)


def test_a_failing_batch_is_retried_per_worker_so_only_the_bad_request_fails():
    async def main():
        c, calls = Coalescer(), []

        async def picky(items):
            calls.append(list(items))
            if "bad" in items:
                raise ValueError("cannot serve 'bad'")
            return [f"r{x}" for x in items]

        async def worker(item):
            async with c.member():
                return await c.submit("policy", picky, [item])

        out = await asyncio.gather(*(worker(x) for x in ("a", "bad", "c")), return_exceptions=True)
        return out, calls

    out, calls = asyncio.run(main())
    assert out[0] == ["ra"] and out[2] == ["rc"]
    assert isinstance(out[1], ValueError)
    assert calls[0] == ["a", "bad", "c"] and sorted(map(tuple, calls[1:])) == [("a",), ("bad",), ("c",)]


def test_a_server_batching_backend_is_called_per_task_and_tasks_do_not_wait_for_each_other():
    """A fast problem finishes its rounds while a slow one is still in its first call."""
    from itscale.strategies.batching import BatchedGenerator
    from itscale.types import Capabilities

    class Server:
        def __init__(self, server_batching):
            self.capabilities = Capabilities(server_batching=server_batching)
            self.calls, self.log = [], []

        async def generate_steps(self, requests):
            self.calls.append(list(requests))
            await asyncio.sleep(0.05 if "slow" in requests[0] else 0.001)
            self.log.append(requests[0])
            return [[r] for r in requests]

    def run(server_batching):
        async def main():
            c, server = Coalescer(), Server(server_batching)
            gen = BatchedGenerator(server, c)

            async def worker(name, rounds):
                async with c.member():
                    for r in range(rounds):
                        await gen.generate_steps([f"{name}.{r}"])

            await asyncio.gather(worker("slow", 1), worker("fast", 3))
            return server

        return asyncio.run(main())

    direct = run(True)
    assert [len(call) for call in direct.calls] == [1, 1, 1, 1]
    assert direct.log == ["fast.0", "fast.1", "fast.2", "slow.0"]
    coalesced = run(False)  # the broken variant for this test: one population call per round
    assert [len(call) for call in coalesced.calls] == [2, 1, 1]
    assert coalesced.log[0] == "slow.0"
