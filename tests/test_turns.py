"""Long jobs and chat steps take turns on the device: a chat keeps decoding while an evaluation holds the lock."""

import threading
import time

import pytest

from kvcache import Engine
from kvcache.engine.chat import GenerationConfig
from kvcache.engine.turns import TurnLock
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
