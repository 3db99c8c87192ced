"""`hybrid-k2 chat` driven through a pseudo-terminal: what a person sees on the screen."""
import sys

import pexpect


def spawn(demo, tmp_path, *extra):
    env = {"HYBRID_K2_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "hybrid_k2", "chat", str(demo), "--device", "cpu", *extra],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect(">>> ")
    return child


def test_multi_turn_reset_stats_save_and_ctrl_d(demo, tmp_path):
    child = spawn(demo, tmp_path, "-n", "8", "--temperature", "0")
    child.sendline("Hello there")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r"last answer: prefill \d+ tok @ [\d.]+ tok/s, decode \d+ tok")
    child.expect(r"memory: RSS [\d.]+ GiB")
    child.expect(">>> ")
    child.sendline("And again")             # second turn: the first turn's tokens are reused from the cache
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect("prompt tokens reused")
    child.expect(">>> ")
    child.sendline("/set temperature 0.9")
    child.expect(r"temperature = 0\.9")
    child.expect(">>> ")
    child.sendline('"""line one')
    child.expect(r"\.\.\. ")
    child.sendline('line two"""')
    child.expect(">>> ")
    transcript = tmp_path / "t.json"
    child.sendline(f"/save {transcript}")
    child.expect("saved 6 messages")
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect(r"\[conversation reset\]")
    child.expect(">>> ")
    child.sendline(f"/save {transcript}")
    child.expect("saved 0 messages")
    child.expect(">>> ")
    child.sendeof()                         # Ctrl-D quits cleanly
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_answer_and_keeps_session(demo, tmp_path):
    child = spawn(demo, tmp_path, "-n", "100000", "--ctx", "4096")
    child.sendline("Tell me everything")
    child.expect("Tell me everything\r\n")   # the terminal's echo of the line
    child.expect(r"\S", timeout=60)          # then the answer's first characters: tokens are streaming
    child.sendintr()                         # Ctrl-C mid-answer
    child.expect(r"\[stopped\]")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect("last answer")
    child.expect(">>> ")
    child.send("half a line")
    child.expect("half a line")              # readline has it (a SIGINT landing before readline waits for input
    child.sendintr()                         # sits until the next key: CPython's readline); Ctrl-C clears the line
    child.expect(">>> ")
    # Enter and Ctrl-C in one write: the terminal discards input it has not delivered when ^C arrives (ISIG
    # without NOFLSH), so the line may never reach readline; either way the session comes back at a prompt
    child.send("Tell me everything\r\x03")
    child.expect(">>> ")
    child.sendline("/set temperature 0.5")
    child.expect(r"temperature = 0\.5")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_bad_setting_and_failed_turn_keep_the_session(demo, tmp_path):
    child = spawn(demo, tmp_path, "-n", "4", "--temperature", "0", "--ctx", "160")
    child.sendline("/set temperature -1")                # refused: the next message would fail with it
    child.expect(r"temperature must be finite and >= 0, got -1\.0; temperature stays 0")
    child.expect(">>> ")
    child.sendline("/set max_new_tokens 0")
    child.expect(r"max_new_tokens must be >= 1, got 0; max_new_tokens stays 4")
    child.expect(">>> ")
    child.sendline("Hello there")
    child.expect(">>> ")
    child.sendline("word " * 120)                        # past the 160-token context: this turn fails ...
    child.expect(r"error: prompt has \d+ tokens but the context window is 160")
    child.expect(">>> ")
    child.sendline("Again")                              # ... and is taken back; the conversation goes on
    child.expect(">>> ")
    transcript = tmp_path / "t.json"
    child.sendline(f"/save {transcript}")
    child.expect("saved 4 messages")                     # Hello there + answer, Again + answer
    child.expect(">>> ")
    child.sendline(f"/save {tmp_path}/no/such/dir/t.md")  # a failed command keeps the session too
    child.expect("error: .*No such file or directory")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    import json
    assert [m["content"] for m in json.loads(transcript.read_text()) if m["role"] == "user"] == ["Hello there", "Again"]
