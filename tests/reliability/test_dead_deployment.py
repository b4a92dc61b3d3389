"""3. Dead deployment: the first of two deployments answers 503 forever.

Both deployments serve ``dd-model`` from the same local server; the first
calls upstream model ``dead`` (the server answers it 503, always), the second
``alive``. 160 requests over 16 sessions, concurrency 8, circuit
``failures_to_open = 3``, ``cooldown_s = 0.5``. Checked, from the server's log:

* every request succeeds, on the second deployment;
* before its first cool-down could end, the dead deployment received at most
  ``failures_to_open`` calls plus the calls already in flight when its circuit
  opened (at most the concurrency): the burst;
* after that, one trial call per cool-down: consecutive calls to it are at
  least ``cooldown_s`` apart, and trials keep coming while the batch runs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rel import deployment, env, ksi, results, run_args, session_requests, write_config, write_requests

N, SESSIONS, CONCURRENCY, FAILURES_TO_OPEN, COOLDOWN_S = 160, 16, 8, 3, 0.5


def test_dead_first_deployment_is_left_alone_but_for_one_trial_per_cooldown(tmp_path: Path, server) -> None:
    server.delay_s = 0.1  # the batch lasts several cool-downs
    server.set_faults(faults_by_model={"dead": "503"})
    reqs = session_requests(N, SESSIONS, "dd-model")
    requests = write_requests(tmp_path / "requests.jsonl", reqs)
    config = write_config(
        tmp_path / "ksi.toml",
        deployment("dead", "dd-model", server.url, upstream="dead"),
        deployment("alive", "dd-model", server.url, upstream="alive"),
        circuit={"failures_to_open": FAILURES_TO_OPEN, "cooldown_s": COOLDOWN_S},
    )
    out, db = tmp_path / "results.jsonl", tmp_path / "ksi.db"
    ran = ksi(run_args(requests, out, db, config, "--concurrency", str(CONCURRENCY)), environ=env())
    assert ran.returncode == 0, ran.stderr[-3000:]

    final = results(out)
    assert sorted(r["request_id"] for r in final) == sorted(r["request_id"] for r in reqs)
    assert Counter((r["status"], r["provider"]) for r in final) == {("ok", "alive"): N}
    assert Counter(a.model for a in server.arrivals if a.fault == "ok") == {"alive": N}

    dead = sorted((a for a in server.arrivals if a.model == "dead"), key=lambda a: a.t)
    assert all(a.fault == "503" for a in dead)
    assert len(dead) >= FAILURES_TO_OPEN
    # the circuit opened once the client had the failures_to_open-th 503: not before that answer was sent
    opened_at = sorted(a.answered_at for a in dead)[FAILURES_TO_OPEN - 1]
    burst = [a for a in dead if a.t < opened_at + COOLDOWN_S]
    trials = dead[len(burst):]
    assert len(burst) <= FAILURES_TO_OPEN + CONCURRENCY, [round(a.t - dead[0].t, 3) for a in dead]
    gaps = [b.t - a.t for a, b in zip(burst[-1:] + trials, trials, strict=False)]
    assert all(g >= COOLDOWN_S * 0.98 for g in gaps), [round(g, 3) for g in gaps]
    # trials kept coming while the batch ran, one per cool-down (not given up on, not much later)
    run_end = max(a.t for a in server.arrivals)
    assert len(trials) >= 2, (len(trials), round(run_end - opened_at, 2))
    assert all(g <= COOLDOWN_S + 1.5 for g in gaps), [round(g, 3) for g in gaps]
    assert run_end - trials[-1].t <= COOLDOWN_S + 1.5
    # every failed call to the dead deployment was failed over to the live one, not waited out
    for r in final:
        assert all(a["provider"] == "dead" and a["error_type"] == "ProviderUnavailable" and not a["delay_s"]
                   for a in r["attempts"][:-1]), r["attempts"]
