"""Long jobs and chat steps take turns on the device: a chat keeps decoding while an evaluation or a calibration
holds the lock, and a calibration's statistics do not count the chat's forwards."""

import threading
import time

import pytest
import torch

from kvcache import Engine
from kvcache.engine.chat import GenerationConfig
from kvcache.engine.turns import TurnLock
from ui import handlers
from ui.handlers.evaluate import _cancellable
from ui.state import AppState, SessionState


def test_take_turns_lets_the_waiting_thread_run_then_takes_the_lock_back():
    lock, ran = TurnLock(), []
    with lock:
        assert lock.take_turns() is False  # nobody waits: the holder goes on at once
        waiter = threading.Thread(target=lambda: (lock.acquire(), ran.append(time.monotonic()), lock.release()))
        waiter.start()
        deadline = time.monotonic() + 10
        while not lock._waiting and time.monotonic() < deadline:
            time.sleep(0.001)
        assert lock.take_turns() is True
        assert ran and lock.locked()  # the waiter ran in between; the holder holds the lock again
        second = threading.Thread(target=lambda: (lock.acquire(), ran.append(time.monotonic()), lock.release()))
        second.start()
        time.sleep(0.05)
        assert len(ran) == 1  # outside take_turns the holder keeps the device
    second.join(timeout=10)
    waiter.join(timeout=10)
    assert len(ran) == 2


@pytest.mark.usefixtures("one_torch_thread")
def test_a_chat_decodes_while_an_evaluation_holds_the_device(loaded_default):
    """The Evaluate tab's progress callback hands the device to the chat's steps between units of work."""
    app = AppState()
    engine = Engine(loaded_default, device_lock=app.device_lock)
    try:
        session = engine.chat("fp16", system_prompt="You are a helpful assistant.")
        report = _cancellable(app, SessionState(), None)
        reply: list[str] = []
        with app.device_lock:  # what the evaluate handler holds for its whole run
            chat = threading.Thread(target=lambda: reply.append(
                session.reply("Name three colours.", GenerationConfig(max_new_tokens=8))))
            chat.start()
            deadline = time.monotonic() + 240
            while chat.is_alive() and time.monotonic() < deadline:
                assert report(0.5, "a unit of work")  # not cancelled: the job goes on
                time.sleep(0.001)  # the job's next unit of work
            assert not chat.is_alive() and reply and reply[0].strip()  # the whole reply came while the job held on
    finally:
        engine.close()


@pytest.mark.usefixtures("one_torch_thread")
def test_a_chat_decodes_while_a_calibration_runs_and_is_not_in_its_statistics(loaded_default, tmp_path):
    from calib.workdir import INPUTS_STATS_FILE, load_work_dir

    app = AppState(work_root=tmp_path)
    app.replace_model(loaded_default)
    try:
        session = app.engine.chat("fp16", system_prompt="You are a helpful assistant.")
        reply: list[str] = []
        chat = threading.Thread(target=lambda: reply.append(
            session.reply("Name three colours.", GenerationConfig(max_new_tokens=4))))
        replied_at: list[float] = []

        def progress(fraction: float, message: str = "") -> None:
            if not chat.ident:
                chat.start()  # the chat asks for the device while the calibration holds it
            if reply and not replied_at:
                replied_at.append(fraction)
            time.sleep(0.005)  # the batch's work: the chat's thread gets to wait for its turn

        with_chat, alone = SessionState(), SessionState()
        handlers.calibrate(app, with_chat, "builtin", None, 4, 32, "channel", False, 1, progress=progress)
        chat.join(timeout=60)
        assert reply and reply[0].strip() and replied_at and replied_at[0] < 1.0  # the reply came during the run
        handlers.calibrate(app, alone, "builtin", None, 4, 32, "channel", False, 1)
        a, b = load_work_dir(with_chat.calib_dir), load_work_dir(alone.calib_dir)
        # bit-identical: the chat's K/V, queries and linear-layer activations were not observed
        for stats in ("key_stats", "value_stats"):
            for stat, per_layer in getattr(a, stats).items():
                assert all(torch.equal(x, y) for x, y in zip(per_layer, getattr(b, stats)[stat], strict=True))
        for moments in ("key_moments", "query_moments"):
            assert all(torch.equal(x, y) for x, y in zip(getattr(a, moments), getattr(b, moments), strict=True))
        inputs = [torch.load(d / INPUTS_STATS_FILE) for d in (with_chat.calib_dir, alone.calib_dir)]
        assert inputs[0].keys() == inputs[1].keys() and all(
            torch.equal(inputs[0][s][n], inputs[1][s][n]) for s in inputs[0] for n in inputs[0][s])
    finally:
        app.cleanup()
