"""``sft ui``: a read-only local dashboard over a runs directory.

Starlette (routing, static files, a test client) on uvicorn (the ASGI server): both small, pure
Python wheels, maintained, and the pair FastAPI itself is built on; a dashboard of a handful of
pages needs no more. Pages are rendered on the server with Jinja2 (autoescaping on, so every
prompt, reply, file name and config value is text, never markup); the one script
(``static/app.js``) only fetches numbers and draws the curves, polling ``metrics.jsonl`` through
``/api/metrics`` so a running run's curves move without a reload. Nothing is loaded from the
network: every asset ships in this package.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from sft.data.types import Conversation
from sft.errors import SftError
from sft.ui import runs as R

HERE = Path(__file__).parent
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SEARCH_CHUNK = 4096  # rows parsed again at a time for the data page's text search


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def make_app(root: Path) -> Any:
    """The Starlette app serving ``root`` (a runs directory, or one run's output_dir)."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.requests import Request
        from starlette.responses import HTMLResponse, JSONResponse
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles
    except ImportError:
        raise SftError("sft ui needs starlette and uvicorn: `pip install 'sft[ui]'`") from None

    root = root.resolve()
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True))
    env.filters["fmt"] = _fmt
    env.filters["whole"] = lambda v: "–" if v is None else f"{v:,.0f}"
    env.filters["interval"] = R.interval_text

    def page(name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(root=str(root), **ctx), status_code=status_code)

    def run_of(request: Request) -> Path:
        rid = request.query_params.get("id", "")
        try:
            return R.resolve_run(root, rid)
        except R.NotARun:
            raise HTTPException(404, f"no run {rid!r} under {root}") from None

    async def runs_page(request: Request) -> HTMLResponse:
        rows = [R.summary(root, r) for r in R.find_runs(root)]
        sweeps = sorted({r["sweep"] for r in rows if r["sweep"] is not None})
        return page("runs.html", runs=rows, sweeps=sweeps, headline=R.HEADLINE)

    async def run_page(request: Request) -> HTMLResponse:
        run = run_of(request)
        before, after = R.read_json(run / "before.json"), R.read_json(run / "after.json")
        config_text = (run / "config.yaml").read_text(encoding="utf-8", errors="replace") \
            if (run / "config.yaml").is_file() else ""
        return page("run.html", run=R.summary(root, run), config_text=config_text, data=R.read_json(run / "data_report.json"),
                    table=before_after(before, after), samples=sample_pairs(before, after),
                    forgetting=forgetting_rows(before, after))

    async def compare_page(request: Request) -> HTMLResponse:
        ids = request.query_params.getlist("id")
        sweep = request.query_params.get("sweep")
        if sweep is not None:
            base = (root / sweep).resolve()
            ids = [R.run_id(root, r) for r in R.find_runs(root)
                   if R.sweep_of(root, r) is not None and (root / R.sweep_of(root, r)).resolve() == base]  # type: ignore[operator]
        found = []
        for rid in ids:
            try:
                found.append(R.resolve_run(root, rid))
            except R.NotARun:
                raise HTTPException(404, f"no run {rid!r} under {root}") from None
        rows = [R.summary(root, r) for r in found]
        diff = R.config_diff([R.load_config(r) for r in found])
        metrics = side_by_side([(R.read_json(r / "before.json"), R.read_json(r / "after.json")) for r in found])
        # a sweep's own verdicts (sweep.json: why each trial was chosen or not), by trial folder name
        report = R.read_json(root / sweep / "sweep.json") if sweep is not None and found else None
        verdicts = report.get("verdicts") if isinstance(report, dict) else None
        verdicts = verdicts if isinstance(verdicts, dict) else {}
        for r in rows:
            r["verdict"] = verdicts.get(r["id"].rsplit("/", 1)[-1])
        return page("compare.html", runs=rows, diff=diff, metrics=metrics, sweep=sweep)

    async def data_page(request: Request) -> HTMLResponse:
        run = run_of(request)
        q = request.query_params.get("q", "").strip()
        try:
            items, note = data_preview(run, q)
        except SftError as e:
            items, note = [], str(e)
        return page("data.html", run=R.summary(root, run), items=items, q=q, note=note)

    async def api_runs(request: Request) -> JSONResponse:
        return JSONResponse([R.summary(root, r) for r in R.find_runs(root)])

    async def api_metrics(request: Request) -> JSONResponse:
        run = run_of(request)
        try:
            offset = max(0, int(request.query_params.get("offset", "0")))
        except ValueError:
            offset = 0
        rows, offset, problems = R.read_metrics(run / "metrics.jsonl", offset)
        return JSONResponse({"rows": rows, "offset": offset, "problems": problems,
                             "status": R.status(run, rows) if rows else R.summary(root, run)["status"]})

    async def not_found(request: Request, exc: Exception) -> HTMLResponse:
        detail = getattr(exc, "detail", "not found")
        code = getattr(exc, "status_code", 404)
        return page("error.html", status_code=code, message=str(detail))

    routes = [
        Route("/", runs_page), Route("/run", run_page), Route("/compare", compare_page), Route("/data", data_page),
        Route("/api/runs", api_runs), Route("/api/metrics", api_metrics),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


def before_after(before: Any, after: Any) -> list[dict[str, Any]]:
    """Rows of the before/after table: every headline number either result has, with its interval
    (``intervals``, where the evaluation computed them)."""
    b, a = before if isinstance(before, dict) else {}, after if isinstance(after, dict) else {}
    keys = [k for k in ("eval_loss", "perplexity", "task_accuracy", "stop_rate", "mean_response_tokens",
                        "refusal_rate", "over_refusal_rate") if k in b or k in a]
    bi, ai = b.get("intervals") or {}, a.get("intervals") or {}
    return [{"metric": k, "before": b.get(k), "after": a.get(k), "before_ci": bi.get(k) if isinstance(bi, dict) else None,
             "after_ci": ai.get(k) if isinstance(ai, dict) else None} for k in keys]


def forgetting_rows(before: Any, after: Any) -> list[dict[str, Any]]:
    fb = (before or {}).get("forgetting") or {} if isinstance(before, dict) else {}
    fa = (after or {}).get("forgetting") or {} if isinstance(after, dict) else {}
    keys = [k for k in ("reference_perplexity", "kl_to_base", "reference_tokens", "reference") if k in fb or k in fa]

    def ci(result: Any, k: str) -> Any:
        iv = ((result.get("intervals") or {}).get("forgetting") or {}) if isinstance(result, dict) else {}
        return iv.get(k) if isinstance(iv, dict) else None

    return [{"metric": k, "before": fb.get(k), "after": fa.get(k), "before_ci": ci(before, k), "after_ci": ci(after, k)}
            for k in keys]


def sample_pairs(before: Any, after: Any) -> list[dict[str, Any]]:
    """Sample replies side by side, matched by prompt."""
    bs = (before or {}).get("samples") or [] if isinstance(before, dict) else []
    as_ = (after or {}).get("samples") or [] if isinstance(after, dict) else []
    by_prompt = {s.get("prompt"): s for s in bs if isinstance(s, dict)}
    out = []
    for s in as_ or bs:
        if not isinstance(s, dict):
            continue
        b = by_prompt.get(s.get("prompt")) if as_ else s
        out.append({"prompt": s.get("prompt"), "reference": s.get("reference"), "before": b, "after": s if as_ else None})
    return out


def side_by_side(results: list[tuple[Any, Any]]) -> list[dict[str, Any]]:
    """The compare page's metric rows: each headline number after training, per run (and before)."""
    rows = []
    for k in (*R.HEADLINE, "perplexity"):
        afters = [a.get(k) if isinstance(a, dict) else None for _, a in results]
        befores = [b.get(k) if isinstance(b, dict) else None for b, _ in results]
        if any(v is not None for v in afters + befores):
            rows.append({"metric": k, "after": afters, "before": befores})
    fa = [((a or {}).get("forgetting") or {}).get("reference_perplexity") if isinstance(a, dict) else None
          for _, a in results]
    if any(v is not None for v in fa):
        rows.append({"metric": "forgetting.reference_perplexity", "after": fa,
                     "before": [((b or {}).get("forgetting") or {}).get("reference_perplexity")
                                if isinstance(b, dict) else None for b, _ in results]})
    return rows


def data_preview(run: Path, q: str, limit: int = 20) -> tuple[list[dict[str, Any]], str]:
    """``sft data preview`` of a run's training data: the examples whose ``file:line`` (or text)
    contains ``q``, the first ``limit`` of them. Loads the run's tokenizer, not its weights."""
    from sft.config import load_config
    from sft.data.chat import config_template
    from sft.data.commands import _tokenizer, preview_items
    from sft.data.pipeline import collect_conversations
    from sft.data.rows import materialize

    cfg = load_config(run / "config.yaml")
    report = R.read_json(run / "data_report.json")
    sources = report.get("sources") if isinstance(report, dict) else None
    if isinstance(sources, list) and len(sources) == len(cfg.data.train):
        for src, stats in zip(cfg.data.train, sources):  # the paths as the run resolved them
            if isinstance(stats, dict) and stats.get("path"):
                src.path = str(stats["path"])
    tok = _tokenizer(cfg)
    template = config_template(cfg, tok)
    convs, _ = collect_conversations(cfg, "train")
    if not q or re.fullmatch(r".+:\d+", q):  # by location: no row is read again
        hits = [c for c in convs if matches(c.location(), "", q)]
    else:  # by text: rows are held as (file, offset) and parsed again, a chunk at a time
        hits = []
        for i in range(0, len(convs), SEARCH_CHUNK):
            hits += [c for c in materialize(convs[i : i + SEARCH_CHUNK]) if matches(c.location(), searchable(c), q)]
    note = f"{len(hits)} of {len(convs)} conversations match" + (f" {q!r}" if q else "")
    if len(hits) > limit:
        note += f"; the first {limit} shown"
    return preview_items(cfg, tok, template, hits[:limit]), note


def searchable(conv: Conversation) -> str:
    """The text the data page searches: every message's content, reasoning and tool calls.

    >>> from sft.data.types import Message
    >>> searchable(Conversation([Message("user", "Hi"), Message("assistant", "Hello", reasoning="greet")]))
    'Hi\\nHello\\ngreet'
    """
    parts = []
    for m in conv.messages:
        parts += [m.content, *([m.reasoning] if m.reasoning else []), *([json.dumps(m.tool_calls)] if m.tool_calls else [])]
    return "\n".join(parts)


def matches(where: str, text: str, q: str) -> bool:
    """The data page's search: ``file:line`` (or ``path/file:line``) names one row exactly; any
    other query is a case-insensitive substring of the location or the conversation.

    >>> [matches(w, "", "train.jsonl:5") for w in ("/d/train.jsonl:5", "/d/train.jsonl:52", "/d/xtrain.jsonl:5")]
    [True, False, False]
    >>> matches("/d/train.jsonl:52", "Hello there", "hello"), matches("/d/a.json:1", "x", "")
    (True, True)
    """
    if not q:
        return True
    if re.fullmatch(r".+:\d+", q):
        return where == q or where.endswith("/" + q)
    return q.lower() in where.lower() or q.lower() in text.lower()


def serve(root: Path, host: str = "127.0.0.1", port: int = 7860) -> int:
    """Run the dashboard until Ctrl-C."""
    if not root.is_dir():
        raise SftError(f"{root}: not a folder; give the runs directory (e.g. runs/) or a run's output_dir")
    app = make_app(root)
    try:
        import uvicorn
    except ImportError:
        raise SftError("sft ui needs starlette and uvicorn: `pip install 'sft[ui]'`") from None
    if host not in LOCAL_HOSTS:
        print(f"warning: sft ui listens on {host}: anyone who can reach this machine on port {port} can read "
              f"every run under {root}", file=sys.stderr)
    print(f"sft ui: http://{'[' + host + ']' if ':' in host else host}:{port}/  (runs under {root.resolve()}; "
          "read-only; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
