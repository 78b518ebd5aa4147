"""No `ftjob` command shows a traceback for anything a user can hand it: each bad input ends with one
line naming the problem and the fix, and the exit code README.md lists for that kind of problem."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from finetune_operator.cli import main
from finetune_operator.cli_errors import (
    EXIT_BUSY,
    EXIT_CLUSTER_UNREACHABLE,
    EXIT_FAILED,
    EXIT_INPUT_MISSING,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_NO_CLUSTER_CONFIG,
)

from tests.support.factories import kubeconfig, manifest

TOKEN = "s3cr3t-token"  # never in a message

# A file a case writes into tmp_path and names on the command line, by what it holds.
Writer = Callable[[Path], Path]


def _text(content: str | bytes) -> Writer:
    def write(tmp: Path) -> Path:
        path = tmp / "job.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return write


def _yaml(*docs: object) -> Writer:
    return _text(yaml.safe_dump_all(list(docs)))


def _missing(tmp: Path) -> Path:
    return tmp / "nowhere.yaml"


def _directory(tmp: Path) -> Path:
    (tmp / "manifests").mkdir()
    return tmp / "manifests"


@dataclass(frozen=True)
class BadFile:
    why: str
    write: Writer
    code: int
    says: str


FILES = [
    BadFile("missing file", _missing, EXIT_INPUT_MISSING, "no such file; check the path"),
    BadFile("a directory", _directory, EXIT_INPUT_MISSING, "is a directory; name a manifest file in it"),
    BadFile("binary file", _text(b"\xff\xfe\x00bin"), EXIT_INVALID, "not a text file"),
    BadFile("broken YAML", _text("spec: [unclosed\n"), EXIT_INVALID, "not valid YAML at line"),
    BadFile("empty file", _text(""), EXIT_INVALID, "no FineTuneJob in this file (the file is empty)"),
    BadFile("a YAML list", _yaml([manifest()]), EXIT_INVALID, "is a YAML list, not a mapping"),
    BadFile("a scalar", _text("hello\n"), EXIT_INVALID, "is a str scalar ('hello'), not a mapping"),
    BadFile(
        "kind typo",
        _yaml(manifest({"kind": "FinetuneJob"})),
        EXIT_INVALID,
        "has kind 'FinetuneJob': set kind: FineTuneJob (apiVersion: finetune.dev/v1alpha1)",
    ),
    BadFile(
        "kind missing",
        _yaml(manifest(drop=("kind",))),
        EXIT_INVALID,
        "has no kind: set kind: FineTuneJob",
    ),
    BadFile(
        "only other kinds",
        _yaml({"apiVersion": "v1", "kind": "ConfigMap"}),
        EXIT_INVALID,
        "no FineTuneJob in this file (its documents are: ConfigMap)",
    ),
    BadFile("metadata a string", _yaml(manifest({"metadata": "audit"})), EXIT_INVALID, "metadata: "),
]


def _ids(case: BadFile) -> str:
    return case.why.replace(" ", "-")


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", FILES, ids=_ids)
@pytest.mark.parametrize("command", ["validate", "render", "run"])
def test_a_bad_file_gets_its_exit_code_and_a_line_naming_the_problem(
    command: str, case: BadFile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = case.write(tmp_path)
    extra = ["--workdir", str(tmp_path / "run")] if command == "run" else []
    assert main([command, str(path), *extra]) == case.code
    err = capsys.readouterr().err
    assert case.says in _one_line(err) + err, err
    assert not (tmp_path / "run").exists(), "nothing is started for a bad file"


def test_validate_reports_every_bad_file_and_exits_with_the_worst(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _yaml(manifest())(tmp_path)
    assert main(["validate", str(tmp_path / "gone.yaml"), str(good)]) == EXIT_INPUT_MISSING
    captured = capsys.readouterr()
    assert "gone.yaml: no such file" in captured.err and "demo ok" in captured.out


def test_run_names_the_count_when_a_file_holds_two_jobs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _yaml(manifest(), manifest(name="other"))(tmp_path)
    assert main(["run", str(path), "--workdir", str(tmp_path / "run")]) == EXIT_INVALID
    assert "exactly one FineTuneJob (found 2)" in _one_line(capsys.readouterr().err)


def test_a_yaml_12_float_is_read_as_kubectl_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = yaml.safe_dump(manifest())
    path = _text(text.replace("spec:\n", "spec:\n  training:\n    learningRate: 1e-4\n", 1))(tmp_path)
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


# -- the cluster commands ---------------------------------------------------------------------------

CLUSTER_COMMANDS = [
    ["status", "demo", "-n", "default"],
    ["describe", "demo", "-n", "default"],
    ["logs", "demo", "-n", "default"],
    ["list", "-n", "default"],
    ["list", "-A"],
]


@pytest.fixture
def no_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when this returns: connections are refused


@pytest.fixture
def forbidding_server() -> Iterator[str]:
    """An HTTP server that answers every request 403, as an API server does to a user without RBAC."""

    class Forbid(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server names its handlers so
            body = b'{"kind":"Status","status":"Failure","reason":"Forbidden","code":403}'
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbid)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.mark.parametrize("argv", CLUSTER_COMMANDS, ids=" ".join)
def test_without_a_kubeconfig_a_cluster_command_says_how_to_give_one(
    argv: list[str], no_kubeconfig: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == EXIT_NO_CLUSTER_CONFIG
    line = _one_line(capsys.readouterr().err)
    assert "no usable kubeconfig" in line and "pass --kubeconfig, set KUBECONFIG" in line


@pytest.mark.parametrize("argv", CLUSTER_COMMANDS, ids=" ".join)
def test_a_kubeconfig_path_that_does_not_exist_is_named(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--kubeconfig", str(tmp_path / "nope")]) == EXIT_NO_CLUSTER_CONFIG
    assert "nope" in _one_line(capsys.readouterr().err)


def test_a_kubeconfig_that_is_not_yaml_is_no_usable_kubeconfig(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _text("clusters: [unclosed\n")(tmp_path)
    assert main(["status", "demo", "-n", "default", "--kubeconfig", str(broken)]) == EXIT_NO_CLUSTER_CONFIG
    assert "no usable kubeconfig" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv", CLUSTER_COMMANDS, ids=" ".join)
def test_an_unreachable_api_server_is_one_line_naming_the_kubeconfig(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = kubeconfig(tmp_path, f"http://127.0.0.1:{_closed_port()}", TOKEN)
    assert main([*argv, "--kubeconfig", str(config)]) == EXIT_CLUSTER_UNREACHABLE
    line = _one_line(capsys.readouterr().err)
    assert "cannot reach the API server" in line and str(config) in line
    assert "s3cr3t-token" not in line


@pytest.mark.parametrize("argv", CLUSTER_COMMANDS, ids=" ".join)
def test_a_refusing_api_server_names_the_status_and_what_to_check(
    argv: list[str], tmp_path: Path, forbidding_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = kubeconfig(tmp_path, forbidding_server, TOKEN)
    assert main([*argv, "--kubeconfig", str(config)]) == EXIT_CLUSTER_UNREACHABLE
    line = _one_line(capsys.readouterr().err)
    assert "refused the request (403" in line and "RBAC" in line
    assert "s3cr3t-token" not in line


@pytest.mark.parametrize("command", ["status", "describe", "logs"])
def test_a_local_job_that_is_not_there_exits_1_naming_where_it_looked(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "ghost", "--workdir", str(tmp_path / "nothing")]) == EXIT_FAILED
    assert "nothing" in _one_line(capsys.readouterr().err)


def test_each_exit_code_is_distinct_and_listed_in_the_readme() -> None:
    codes = [
        EXIT_FAILED, EXIT_INVALID, EXIT_INPUT_MISSING, EXIT_NO_CLUSTER_CONFIG, EXIT_CLUSTER_UNREACHABLE,
        EXIT_BUSY, EXIT_INTERRUPTED,
    ]  # fmt: skip
    assert len(set(codes)) == len(codes) and 0 not in codes
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("### `ftjob` exit codes", 1)[1].split("\n#", 1)[0]
    assert all(f"\n| {code} |" in table for code in [0, *codes]), table


# -- writing and the command line -------------------------------------------------------------------


def test_docs_write_into_a_missing_directory_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["docs", "--write", str(tmp_path / "missing" / "api.md")]) == EXIT_INPUT_MISSING
    line = _one_line(capsys.readouterr().err)
    assert "cannot write" in line and "missing" in line


def test_crd_write_into_a_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = _text("not a directory")(tmp_path)
    assert main(["crd", "--write", str(blocker / "crds")]) == EXIT_INPUT_MISSING
    assert "cannot write" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["render", "job.yaml", "--attempt", "0"], "attempts count from 1"),
        (["logs", "demo", "--attempt", "-1"], "attempts count from 1"),
        (["logs", "demo", "--rank", "-1"], "node ranks count from 0"),
        (["logs", "demo", "--rank", "one"], "'one' is not a whole number"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_a_bad_number_on_the_command_line_is_a_usage_error(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_INVALID
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
