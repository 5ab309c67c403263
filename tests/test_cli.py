"""The command line driven as a user would: subprocesses, piped stdin, a pseudo-terminal for Ctrl-C."""

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chat_fixture import build_chat_model_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_chat_model_dir(tmp_path_factory.mktemp("cli") / "model")


def phiflash(*args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def answers(stdout):
    """The answer text after each '>>> ' prompt line (up to its stats line)."""
    out = []
    for block in stdout.split(">>> ")[1:]:
        lines = block.split("\n")
        body = [l for l in lines[1:] if not l.startswith("[")]
        out.append("\n".join(body).strip())
    return out


def test_generate_json(model_dir):
    r = phiflash("generate", "--model", str(model_dir), "--prompt", "what is 2 plus 2?", "--json", "--temp", "0",
                 "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["generation_tokens"] <= 8 and out["prompt_tokens"] > 0
    assert set(out) >= {"text", "reasoning", "answer", "finish_reason", "generation_tps", "prompt_tps"}
    again = phiflash("generate", "--model", str(model_dir), "--json", "--temp", "0", "--max-tokens", "8",
                     stdin="what is 2 plus 2?")
    assert json.loads(again.stdout)["text"] == out["text"]          # stdin gives the same as --prompt


def test_chat_remembers_turns_and_reset_forgets(model_dir):
    args = ["chat", "--model", str(model_dir), "--temp", "0", "--max-tokens", "12"]
    r = phiflash(*args, stdin="what is 2 plus 2?\nand 3 plus 3?\n/reset\nand 3 plus 3?\n/exit\n")
    assert r.returncode == 0, r.stderr
    first, second, reset_note, after_reset = answers(r.stdout)[:4]
    alone = answers(phiflash(*args, stdin="and 3 plus 3?\n").stdout)[0]
    assert "[conversation reset]" in r.stdout
    assert after_reset == alone                  # after /reset the history is gone
    assert second != alone                       # with the history the answer differs: it was remembered
    # the second turn prefilled only its own tokens, not the history
    prompts = [int(m) for m in re.findall(r"prompt (\d+) tokens", r.stdout)]
    assert prompts[1] < prompts[0] + prompts[1] - 1 and prompts[1] <= prompts[2] + 1


def test_chat_system_and_unknown_command(model_dir):
    r = phiflash("chat", "--model", str(model_dir), "--max-tokens", "4", stdin="/system be brief\n/bogus\n/exit\n")
    assert r.returncode == 0
    assert "[system message set; conversation reset]" in r.stdout
    assert "[unknown command /bogus; try /help]" in r.stdout


def test_ctrl_c_stops_the_answer_but_not_the_chat(model_dir):
    pid, fd = pty.fork()
    if pid == 0:                                 # child: the chat on a pseudo-terminal
        os.chdir(ROOT)
        # as from a terminal: a runner started in the background (`cmd &`) hands down SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # greedy: this model's answer to the question below never ends (a sampled one may end within the
        # two seconds, as it is drawn)
        os.execv(sys.executable, [sys.executable, "cli.py", "chat", "--model", str(model_dir), "--temp", "0",
                                  "--max-tokens", "1000000", "--max-context", "10000000"])
    out = b""

    def read_until(pattern, timeout=60):
        nonlocal out
        end = time.time() + timeout
        while time.time() < end:
            if re.search(pattern, out):
                return True
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    break
        return bool(re.search(pattern, out))

    try:
        assert read_until(rb">>> "), out
        os.write(fd, b"what is 2 plus 2?\n")
        time.sleep(2.0)                          # let it generate for a while
        os.kill(pid, signal.SIGINT)
        assert read_until(rb"\[stopped\]"), out[-500:]
        assert read_until(rb">>> ", 30)
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "/nonexistent/model", "--prompt", "hi"], "does not exist"),
    (["generate", "--prompt", "hi", "--temp", "-1"], "temperature must be >= 0"),
    (["convert", "/nonexistent/a", "/tmp/b"], "does not exist"),
])
def test_errors_are_one_line(model_dir, args, message):
    if "--temp" in args:
        args = args[:1] + ["--model", str(model_dir)] + args[1:]
    r = phiflash(*args)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len([l for l in r.stderr.splitlines() if l.startswith("phiflash")]) == 1


def test_prompt_too_long_for_context(model_dir):
    r = phiflash("generate", "--model", str(model_dir), "--prompt", "what is 1 plus 2? " * 20, "--max-context", "16")
    assert r.returncode == 1 and "limit is 16" in r.stderr and "Traceback" not in r.stderr


def test_unknown_option_is_a_usage_error():
    r = phiflash("generate", "--bogus")
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr and "Traceback" not in r.stderr


def test_every_command_has_help_with_examples():
    r = phiflash("--help")
    commands = re.findall(r"^    (\S+)\s", r.stdout, re.M)
    assert {"chat", "generate", "convert", "quality", "golden", "verify", "info"} <= set(commands)
    for command in commands:
        h = phiflash(command, "--help")
        assert h.returncode == 0 and "example" in h.stdout.lower(), command
