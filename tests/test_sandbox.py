"""The sandbox that runs model-written code: time limit, no network, files outside its folder safe."""

from __future__ import annotations

import socket
import threading

import pytest

from tridlm.eval.sandbox import Limits, run_python

FAST = Limits(timeout_s=3.0, memory_mb=512)


def test_a_passing_and_a_failing_program():
    ok = run_python("import math\nassert math.gcd(12, 18) == 6\nprint('fine')\n", FAST)
    assert ok.status == "passed" and ok.stdout.strip() == "fine"
    bad = run_python("def f(x):\n    return x + 1\nassert f(1) == 3\n", FAST)
    assert bad.status == "failed" and "AssertionError" in bad.stderr


def test_an_infinite_loop_is_stopped():
    r = run_python("while True:\n    pass\n", Limits(timeout_s=1.5))
    assert r.status == "timeout" and not r.passed


def test_a_sleeping_program_is_killed_at_the_limit():
    r = run_python("import time\ntime.sleep(60)\n", Limits(timeout_s=1.5))
    assert r.status == "timeout" and r.seconds < 30


def test_deleting_files_outside_its_folder_is_contained(tmp_path):
    victim_dir = tmp_path / "precious"
    victim_dir.mkdir()
    victim = victim_dir / "data.txt"
    victim.write_text("keep me")
    attempts = [("remove", f"os.remove({str(victim)!r})"), ("rmtree", f"shutil.rmtree({str(victim_dir)!r})"),
                ("open", f"open({str(victim)!r}, 'w').write('gone')")]
    program = "import os, shutil\n" + "".join(
        f"try:\n    {call}\nexcept Exception as e:\n    print({name!r}, type(e).__name__)\n" for name, call in attempts)
    program += f"os.remove({str(victim)!r})\n"
    r = run_python(program, FAST)
    assert not r.passed
    assert victim.read_text() == "keep me"
    assert "remove PermissionError" in r.stdout and "open PermissionError" in r.stdout


def test_files_inside_its_own_folder_work():
    r = run_python("open('scratch.txt', 'w').write('x')\nimport os\nos.remove('scratch.txt')\n", FAST)
    assert r.passed, r.stderr


def test_no_network_and_no_processes():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True)
    t.start()
    try:
        r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n", FAST)
        assert not r.passed and not accepted
        r = run_python("import subprocess\nsubprocess.run(['true'])\n", FAST)
        assert not r.passed and "PermissionError" in r.stderr
        r = run_python("import ctypes\n", FAST)
        assert not r.passed
    finally:
        server.close()


@pytest.mark.parametrize("program", ["x = ' ' * (4 << 30)\n", "import os\nprint(sorted(os.environ))\n"])
def test_memory_limit_and_minimal_environment(program):
    r = run_python(program, FAST)
    if "environ" in program:
        assert r.passed and set(eval(r.stdout)) <= {"PATH", "LANG", "HOME", "LC_CTYPE"}
    else:
        assert not r.passed and "MemoryError" in r.stderr
