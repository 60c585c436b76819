"""Faults injected into an engine's runner for the request-isolation tests of the overlapped
steps (test_pipeline_models.py, test_async_scheduling.py): a dispatch that raises for one
request's steps, and collects that raise a given number of times."""


def poison_dispatch(monkeypatch, runner, bad_prompt) -> None:
    """`runner.dispatch_all` raises OverflowError("poisoned request") for every step holding a
    chunk of the request whose prompt is `bad_prompt` (monkeypatch.undo or setattr restores it)."""
    dispatch_all = runner.dispatch_all

    def poisoned(steps):
        if any(c.request.prompt_token_ids == bad_prompt for s in steps for c in s.chunks):
            raise OverflowError("poisoned request")
        return dispatch_all(steps)

    monkeypatch.setattr(runner, "dispatch_all", poisoned)


def fail_collects(monkeypatch, runner, times: int, when=lambda: True) -> list:
    """`runner.collect` raises RuntimeError("device error") the first `times` times it is called
    while `when()` holds; returns the list of the steps it failed (filled as they fail)."""
    collect, failures = runner.collect, []

    def flaky(step):
        if len(failures) < times and when():
            failures.append(step)
            raise RuntimeError("device error")
        return collect(step)

    monkeypatch.setattr(runner, "collect", flaky)
    return failures
