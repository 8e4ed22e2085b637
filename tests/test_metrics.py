"""What a user sees of a run beyond metrics.jsonl: wandb, without a network."""

import socket

import pytest

from smollm2.metrics import start_wandb


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: nothing listens there


def test_wandb_with_a_key_and_no_server_logs_offline_at_once(tmp_path, monkeypatch, capsys):
    """wandb would retry its server for 90 s (init_timeout) before its own warning; the run goes offline."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = start_wandb(tmp_path, {"train": {"lr": 1e-3}}, "smollm2-test")
    try:
        assert run is not None and run.settings.mode == "offline"
        run.log({"loss": 1.0}, step=1)
    finally:
        if run is not None:
            run.finish()
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(ours) == 1 and "wandb cannot reach http://127.0.0.1:" in ours[0], ours
    assert f"logging offline to {tmp_path / 'wandb'}" in ours[0]
    assert any((tmp_path / "wandb").glob("offline-run-*"))
