"""The server operator's command: ``fedrec recommend``, the global model a run produced, served.

    fedrec recommend RUN_DIR (--items 50,172,181 | --history FILE) [--top 10]

The run directory is the one the ServerApp writes (``server/server_app.py``); the adapter of its
last committed round is loaded with PEFT on the base model it was trained on.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from common.cli import console, fail


def register(commands) -> None:
    p = commands.add_parser("recommend", help="top-10 items for a history, from a run's latest global adapter")
    p.add_argument("run_dir")
    p.add_argument("--items", help="comma-separated item ids, oldest first")
    p.add_argument("--history", help="file with one item_id[,rating] per line, oldest first")
    p.add_argument("--top", type=int, default=10)
    p.set_defaults(func=recommend_cmd)



def read_history_file(path: Path) -> list[tuple[str, float | None]]:
    """One item per line: ``item_id`` or ``item_id,rating``; '#' starts a comment."""
    if not path.is_file():
        fail(f"--history {path}: file not found")
    history = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        item, _, rating = line.partition(",")
        try:
            history.append((item.strip(), float(rating) if rating.strip() else None))
        except ValueError:
            fail(f"{path}:{n}: rating {rating.strip()!r} is not a number")
    if not history:
        fail(f"--history {path}: no items")
    return history


def recommend_cmd(args) -> int:
    from common.recommend import check_request, load_recommender, read_run, recommend

    if bool(args.items) == bool(args.history):
        fail("give the user's history with exactly one of --items or --history")
    history = read_history_file(Path(args.history)) if args.history else [
        (i.strip(), None) for i in args.items.split(",") if i.strip()]
    try:
        check_request(read_run(Path(args.run_dir))[0], history, args.top)  # in a second, not after the encoding
        model, tokenizer, catalog, s = load_recommender(Path(args.run_dir))
        top = recommend(model, tokenizer, catalog, s, history, args.top)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    table = Table(title=f"Top {args.top} for a history of {len(history)} items")
    for col in ("#", "item", "title", "year", "genres", "score"):
        table.add_column(col)
    for rank, (item, score) in enumerate(top, start=1):
        table.add_row(str(rank), item.item_id, item.title, str(item.year or ""), ", ".join(item.genres), f"{score:.2f}")
    console.print(table)
    return 0
