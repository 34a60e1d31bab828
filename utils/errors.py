"""The one way a script reports bad input: a single line and a non-zero exit."""
import functools
import os
import sys


class UserError(Exception):
    """Bad input from the person running a script (config, data, checkpoint).

    The message is one line that says what is wrong and, where it can, how to fix it.
    Entry scripts catch it in `cli_main`, print it and exit with `exit_code` (2; 130 for an
    interrupt, as a shell reports Ctrl-C).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(error: Exception, limit: int = 200) -> str:
    """The first line of an error's message (its type when it has none), for a one-line report;
    TensorStore's multi-kilobyte spec dump is cut off."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line.split(" See full TensorStore details")[0][:limit]


def cli_main(main):
    """Wrap a script's main(argv) so a UserError prints one line and exits 2."""

    @functools.wraps(main)
    def wrapped(argv=None):
        enable_compilation_cache()
        from utils.distributed import initialize_from_env

        initialize_from_env()
        try:
            return main(sys.argv[1:] if argv is None else argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(error.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapped


def enable_compilation_cache():
    """Keep compiled programs on disk so a second run (or a resumed one) starts at once."""
    import jax

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "edfm", "jax"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
