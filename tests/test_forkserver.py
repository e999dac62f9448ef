"""The test fork server (tests/forkserver.py) behaves as subprocess does for what the CLI tests read."""
import os
import signal
import subprocess
import sys

import forkserver

SHOW = "import os, sys; print(sys.argv[1:], os.getcwd(), os.environ.get('MARK')); print('err', file=sys.stderr)"


def test_a_forked_command_gets_its_argv_cwd_env_and_streams(tmp_path):
    result = forkserver.run([sys.executable, "-c", SHOW, "a b", "c"], cwd=tmp_path, env={**os.environ, "MARK": "7"})
    assert forkserver.ENABLED
    assert result.returncode == 0 and result.stdout == f"['a b', 'c'] {tmp_path} 7\n" and result.stderr == "err\n"
    assert "MARK" not in os.environ  # the caller's environment is untouched


def test_exit_statuses_are_subprocess_s(tmp_path):
    codes = {"raise SystemExit(3)": 3, "import sys; sys.exit('no')": 1, "1 / 0": 1, "pass": 0,
             "import os, signal; os.kill(os.getpid(), signal.SIGKILL)": -signal.SIGKILL}
    for code, status in codes.items():
        result = forkserver.run([sys.executable, "-c", code], cwd=tmp_path)
        assert result.returncode == status, code
    assert "ZeroDivisionError" in forkserver.run([sys.executable, "-c", "1 / 0"]).stderr


def test_popen_can_be_killed_and_times_out(tmp_path):
    process = forkserver.popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"])
    assert process.poll() is None
    process.kill()
    assert process.wait(timeout=30) == -signal.SIGKILL
    try:
        forkserver.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5)
    except subprocess.TimeoutExpired:
        pass
    else:
        raise AssertionError("no timeout")


def test_a_module_runs_as_main_and_other_commands_are_plain_subprocesses(tmp_path):
    result = forkserver.run([sys.executable, "-m", "train_seg", "--version"], cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("train_seg") and "RuntimeWarning" not in result.stderr
    for command in (["true"], [sys.executable, "-m", "json.tool", "--help"]):
        process = forkserver.popen(command)
        assert isinstance(process, subprocess.Popen)
        process.communicate()


def test_a_script_runs_as_main_with_its_own_folder_on_the_path(tmp_path):
    (tmp_path / "helper_mod.py").write_text("VALUE = 7\n")
    script = tmp_path / "script.py"
    script.write_text("import sys, helper_mod\nprint(__name__, sys.argv[1:], helper_mod.VALUE)\n")
    result = forkserver.run([sys.executable, str(script), "x"], cwd="/")
    assert result.returncode == 0 and result.stdout == "__main__ ['x'] 7\n", result.stderr
