"""its_hub's side of ``benchmarks/vs_its_hub.py``: runs inside ``.venv-itshub``, not itscale's venv.

The driver starts ``.venv-itshub/bin/python benchmarks/its_hub_side.py`` once per
run (method, budget, seed) and talks to it in JSON lines over the process's stdin/stdout:

1. driver → worker: one *job* line (the method, the budget, the problems, the policy
   server and every sampling / stopping setting; see ``make_algorithm``); after an
   untimed warm-up the worker sends ``{"type": "ready", "id": I}`` and starts the
   clock when the driver answers;
2. worker → driver: ``{"type": "score", "id": I, "prompt": P, "responses": [...]}``
   whenever its_hub asks its process reward model for scores; the driver scores the
   responses with *itscale's* ``RemoteTagPRM`` (the same client, PRM server and
   aggregation itscale uses) and answers ``{"id": I, "scores": [...]}`` (``null``
   for a score that failed: that raises, as a failing PRM would inside its_hub, and
   the problem counts as an error);
3. worker → driver: ``{"type": "result", "wall": seconds, "cpu": seconds, "results": [...]}``
   with the final text its_hub chose for every problem (or the error that ended it).

So its_hub gets our PRM's scores through its own ``AbstractProcessRewardModel``
interface (``PipePRM``), identical by construction, and everything else — step
generation, requests to the policy server, resampling, beam bookkeeping, voting —
is its_hub's own code, used through its public classes: one
``OpenAICompatibleLanguageModel`` on the policy server's ``/v1``, a
``StepGeneration`` with the step delimiter, and ``await algorithm.ainfer(lm,
prompt, budget)``. All problems run concurrently (``asyncio.gather`` over
``ainfer``), which is how its_hub runs many prompts at once: its algorithms batch
within one prompt (every particle's request sent concurrently) but not across prompts.

The protocol uses a duplicate of the original stdout file descriptor; ``sys.stdout``
is pointed at stderr so that a stray ``print`` in a library cannot break it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import random
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
from its_hub.api import AbstractProcessRewardModel
from its_hub.core.algorithms.beam_search import BeamSearch
from its_hub.core.algorithms.particle_gibbs import ParticleFiltering
from its_hub.core.algorithms.self_consistency import SelfConsistency
from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel
from its_hub.core.lms.step_generation import StepGeneration
from its_hub.core.orchestrator import LMOrchestrator

ROOT = Path(__file__).resolve().parents[1]


def _answers_module():
    """itscale's answer extraction (``src/itscale/tasks/answers.py``, stdlib only), loaded by
    path: self-consistency votes on exactly the key itscale's majority vote uses."""
    spec = importlib.util.spec_from_file_location("itscale_answers", ROOT / "src" / "itscale" / "tasks" / "answers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Channel:
    """JSON lines to the driver (a private copy of stdout) and replies from it (stdin)."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        sys.stdout = sys.stderr  # nothing else may write to the protocol stream
        self._waiting: dict[int, asyncio.Future] = {}
        self._next = 0
        self._reader: asyncio.StreamReader | None = None

    def send(self, message: dict) -> None:
        self._out.write(json.dumps(message) + "\n")

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._reader = asyncio.StreamReader(limit=1 << 26)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self._reader), sys.stdin)

    async def read_job(self) -> dict:
        return json.loads(await self._reader.readline())

    async def listen(self) -> None:
        """Route replies to the requests waiting for them, until the driver closes stdin."""
        while line := await self._reader.readline():
            reply = json.loads(line)
            future = self._waiting.pop(reply["id"], None)
            if future is not None and not future.done():
                future.set_result(reply["scores"])
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("the driver closed the PRM channel"))

    async def ask(self, message: dict) -> list:
        self._next += 1
        future = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = future
        self.send({**message, "id": self._next})
        return await future


class PipePRM(AbstractProcessRewardModel):
    """its_hub's PRM interface, answered with itscale's PRM scores by the driver.

    its_hub calls ``ascore(prompt, responses)`` with each response the steps joined by
    the step delimiter (``StepGeneration._post_process(steps, stopped=True)``); the
    driver cuts them back at the delimiter, so both libraries score the same steps.
    """

    def __init__(self, channel: Channel):
        self.channel = channel
        self.calls = 0

    async def ascore(self, prompt_or_messages, steps):
        single = isinstance(steps, str)
        responses = [steps] if single else list(steps)
        self.calls += 1
        scores = await self.channel.ask({"type": "score", "prompt": str(prompt_or_messages), "responses": responses})
        if any(s is None for s in scores):
            raise RuntimeError("the PRM failed to score a response")
        scores = [float(s) for s in scores]
        return scores[0] if single else scores

    def score(self, prompt_or_messages, steps):
        return asyncio.run(self.ascore(prompt_or_messages, steps))


def make_algorithm(job: dict, prm: PipePRM, answers) -> tuple[object, OpenAICompatibleLanguageModel]:
    """its_hub's algorithm and language model for one job (see the driver's docstring for the
    settings that are matched to itscale's)."""
    method = job["method"]
    full = method == "self_consistency"
    lm = OpenAICompatibleLanguageModel(
        endpoint=job["policy_url"],
        api_key="EMPTY",
        model_name=job["model"],
        temperature=job["temperature"],
        # a step's token limit (StepGeneration cannot take one together with a step token, so the
        # model's default applies); for whole solutions the limit itscale uses for them
        max_completion_tokens=job["max_full_tokens"] if full else job["max_step_tokens"],
        max_tries=job["max_tries"],
    )
    if full:
        def project(text: str):
            return answers.answer_key(answers.extract_answer(text))

        algorithm = SelfConsistency(consistency_space_projection_func=project,
                                    orchestrator=LMOrchestrator(max_concurrency=job["sc_max_concurrency"]))
        return algorithm, lm
    sg = StepGeneration(
        # its_hub stops a particle when it already had ``max_steps`` steps before this one, i.e.
        # after max_steps + 1 steps; itscale stops at ``max_steps`` steps
        max_steps=job["max_steps"] - 1,
        step_token=job["delimiter"],
        stop_token=job["stop_token"],
        temperature=job["temperature"],
    )
    if method == "particle_filtering":
        return ParticleFiltering(sg, prm), lm
    if method == "beam_search":
        return BeamSearch(sg, prm, beam_width=job["its_hub_beam_width"]), lm
    raise ValueError(f"unknown method {method!r}")


async def run_job(channel: Channel, job: dict) -> dict:
    answers = _answers_module()
    random.seed(job["seed"])  # its_hub draws from the global random and numpy generators
    np.random.seed(job["seed"])
    prm = PipePRM(channel)
    algorithm, lm = make_algorithm(job, prm, answers)

    # warm-up, untimed: one request through its_hub's client and one PRM round trip
    await lm.agenerate([{"role": "user", "content": job["problems"][0]["prompt"]}], max_completion_tokens=4)
    await prm.ascore(job["problems"][0]["prompt"], ["1+1=2"])
    prm.calls = 0
    await channel.ask({"type": "ready"})  # the driver snapshots the servers' counters, then answers

    async def one(problem: dict) -> dict:
        start = time.perf_counter()
        try:
            response = await algorithm.ainfer(lm, problem["prompt"], job["budget"])
            return {"id": problem["id"], "text": response.get("content") or "", "error": None,
                    "seconds": time.perf_counter() - start}
        except Exception as err:  # one problem's failure never ends the batch (as itscale's run_many)
            return {"id": problem["id"], "text": "", "error": f"{type(err).__name__}: {err}",
                    "seconds": time.perf_counter() - start}

    start, cpu = time.perf_counter(), time.process_time()
    results = await asyncio.gather(*(one(p) for p in job["problems"]))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    await lm.close()
    return {"type": "result", "wall": wall, "cpu": cpu, "prm_calls": prm.calls, "results": results}


async def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    warnings.simplefilter("ignore", DeprecationWarning)  # its step generation calls the deprecated agenerate
    channel = Channel()
    await channel.open()
    job = await channel.read_job()
    listener = asyncio.create_task(channel.listen())
    try:
        channel.send(await run_job(channel, job))
    except Exception:
        channel.send({"type": "failed", "error": traceback.format_exc()})
    listener.cancel()


if __name__ == "__main__":
    asyncio.run(main())
