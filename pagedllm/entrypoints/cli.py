"""CLI placeholder."""


def main() -> None:
    raise SystemExit(0)
