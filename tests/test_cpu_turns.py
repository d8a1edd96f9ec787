"""CpuTurns: the server's heavy threads compute one at a time, in the order they asked, and a holder may nest."""
import threading
import time

from funaudiochat.serve.cpu_turns import CpuTurns


def _contend(turns: CpuTurns, workers: int = 4, rounds: int = 30) -> tuple[int, list[int]]:
    """Threads that each take `rounds` turns of ~1 ms -> (most threads inside at once, the order turns were held)."""
    inside, most, order, lock = 0, 0, [], threading.Lock()

    def work(w):
        nonlocal inside, most
        for _ in range(rounds):
            with turns.turn():
                with lock:
                    inside += 1
                    most = max(most, inside)
                    order.append(w)
                time.sleep(0.001)
                with lock:
                    inside -= 1

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return most, order


def test_one_thread_computes_at_a_time_and_turns_alternate():
    most, order = _contend(CpuTurns())
    assert most == 1
    # first come, first served: a thread that ends its turn and asks again queues behind the others already
    # waiting, so no thread holds two turns in a row while others wait (the middle of the run, once all wait)
    middle = order[20:100]
    assert all(a != b for a, b in zip(middle, middle[1:])), middle


def test_disabled_turns_let_threads_run_at_once():
    most, _ = _contend(CpuTurns(enabled=False), workers=4, rounds=10)
    assert most > 1


def test_a_holder_can_take_a_nested_turn_and_others_wait_for_the_outer_one():
    turns, events = CpuTurns(), []
    with turns.turn():
        def other_thread():
            with turns.turn():
                events.append("other")

        other = threading.Thread(target=other_thread)
        other.start()
        with turns.turn():  # nested: no deadlock
            events.append("nested")
        time.sleep(0.05)
        events.append("outer ends")
    other.join(timeout=10)
    assert events == ["nested", "outer ends", "other"]
