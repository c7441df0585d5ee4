"""The quiet console: what reaches the terminal, what only the log file gets, and that nothing is lost."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import logging, os, subprocess, sys, warnings
    from engine import console
    from engine.console import FILE_ONLY

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print("before: on stdout")
    with console.quiet(sys.argv[1]):
        print("a print")
        os.write(2, b"a raw write to fd 2\\n")
        subprocess.run([sys.executable, "-c", "print('a child process')"])
        warnings.warn("a python warning")
        logging.getLogger("vllm.engine").info("a library's info line")
        logging.getLogger("ray").warning("a library's warning")
        logging.getLogger("engine.run").info("our step line")
        logging.getLogger("actors.inference.pool").warning("our warning")
        logging.getLogger("engine.run").info("our plan in detail", extra=FILE_ONLY)
        logging.getLogger("vllm.core").error("a library's error")
        console.echo("the final table")
    print("after: on stdout again")
''')


def test_the_terminal_gets_our_lines_and_the_log_gets_everything(tmp_path):
    log = tmp_path / "logs" / "tandem.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    terminal = done.stdout + done.stderr
    shown = ["before: on stdout", "our step line", "warning: our warning", "error: a library's error",
             "the final table", "after: on stdout again"]
    hidden = ["a print", "a raw write", "a child process", "a python warning", "a library's info line",
              "a library's warning", "our plan in detail"]
    assert all(line in terminal for line in shown), terminal
    assert not any(line in terminal for line in hidden), terminal
    assert done.stdout.splitlines() == ["before: on stdout", "the final table", "after: on stdout again"]
    written = log.read_text()
    assert all(line in written for line in hidden + ["our step line", "our warning", "the final table"]), written
    assert "engine.run: our step line" in written  # the file keeps the logger's name and level
    assert "before:" not in written and "after:" not in written


def test_a_second_run_appends_to_the_log(tmp_path):
    log = tmp_path / "tandem.log"
    for _ in range(2):
        subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=60,
                       check=True)
    assert log.read_text().count("a child process") == 2


BARS = textwrap.dedent('''
    import logging, sys, time
    from actors import progress
    from engine import console

    logging.basicConfig(level=logging.INFO)
    with console.quiet(sys.argv[1]):
        with progress.bar("evaluate 'p' (6 x 15)", total=30, unit="run") as bar:
            for _ in range(30):
                bar.update()
                time.sleep(0.01)
        logging.getLogger("engine.run").info("the step's line")
''')


def test_bars_are_drawn_and_erased_on_a_terminal_and_never_written_into_a_pipe(tmp_path):
    import os
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", BARS, str(tmp_path / "a.log")], stdin=slave, stdout=slave,
                            stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=60) == 0
    screen = seen.decode(errors="replace")
    assert "evaluate 'p' (6 x 15):" in screen and "/30" in screen  # drawn while the phase ran
    last = screen.rstrip().splitlines()[-1]
    assert last.endswith("the step's line") and "evaluate" not in last.split("\r")[-1]  # erased, the line stays
    piped = subprocess.run([sys.executable, "-c", BARS, str(tmp_path / "b.log")], capture_output=True, text=True,
                           timeout=60)
    assert "evaluate" not in piped.stdout + piped.stderr and "the step's line" in piped.stderr
    assert "evaluate" not in (tmp_path / "b.log").read_text()  # nor into the log
