"""What `ftjob` exits with, and the one-line errors that carry a code: no command prints a traceback
for anything a user can give it (a file, a name, a kubeconfig, a cluster). README.md lists the codes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

EXIT_OK = 0
EXIT_FAILED = 1  # `ftjob run`: the job ended Failed; status/describe/logs: no such job, rank or log
EXIT_INVALID = 2  # the manifest (or the command line, as argparse reports it) is invalid
EXIT_INPUT_MISSING = 3  # a file named on the command line is missing, a directory or unreadable
EXIT_NO_CLUSTER_CONFIG = 4  # -n/-A without a usable kubeconfig
EXIT_CLUSTER_UNREACHABLE = 5  # the API server cannot be reached, or refused the credentials
EXIT_BUSY = 6  # another `ftjob run` holds the workdir
EXIT_INTERRUPTED = 130  # `ftjob run` suspended by Ctrl-C (or SIGTERM); run it again to resume


class CliError(Exception):
    """A problem with what the user gave us: printed as one line, exits with `code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@contextlib.contextmanager
def cluster_errors(kubeconfig: str | None) -> Iterator[None]:
    """Turn the kubernetes client's failures into CliErrors that name the fix.

    Credentials never reach the message: only the kubeconfig's path, the server's reason phrase and
    the kind of network failure."""
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException
    from urllib3.exceptions import HTTPError
    from yaml import YAMLError

    which = kubeconfig or "$KUBECONFIG or ~/.kube/config"
    try:
        yield
    except (ConfigException, YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "no configuration"
        raise CliError(
            EXIT_NO_CLUSTER_CONFIG,
            f"no usable kubeconfig ({which}: {first[:120]}); pass --kubeconfig, set KUBECONFIG, or "
            "leave out -n/-A to read a local run",
        ) from None
    except FileNotFoundError as exc:  # a --kubeconfig path that does not exist
        raise CliError(
            EXIT_NO_CLUSTER_CONFIG, f"kubeconfig {exc.filename or which} does not exist; pass --kubeconfig"
        ) from None
    except ApiException as exc:
        if exc.status in (401, 403):
            fix = "check the kubeconfig's user and its RBAC permissions on finetunejobs and pods"
        else:
            fix = "check the cluster's health and that the FineTuneJob CRD is installed"
        raise CliError(
            EXIT_CLUSTER_UNREACHABLE, f"the API server refused the request ({exc.status} {exc.reason}); {fix}"
        ) from None
    except HTTPError as exc:  # MaxRetryError, NewConnectionError, SSLError, timeouts
        reason = getattr(exc, "reason", None) or exc
        kind = type(reason).__name__
        raise CliError(
            EXIT_CLUSTER_UNREACHABLE,
            f"cannot reach the API server ({kind}); check the server address in {which} and the network",
        ) from None
