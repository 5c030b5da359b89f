"""Command hooks: ``lungvision worker`` runs the Celery worker and its sweeper; ``lungvision jobs`` lists
and replays dead letters (failed analyses and deliveries that ran out of attempts)."""

from collections.abc import Callable

import typer

from config.settings import Settings


def worklist_labels(
    settings: Settings, weights_sha256: str
) -> tuple[list[int], list[float], list[str | None], dict[str, int]]:
    """Labels, raw logits and populations of the studies radiologists marked agree/disagree in the
    worklist (for ``calibrate --from-worklist`` and ``evaluate --from-worklist``)."""
    from common.store import Store
    from worker.review import reviewed_scores

    scores = reviewed_scores(Store(settings.store.url), weights_sha256)
    return scores.labels, scores.logits, scores.populations, scores.skipped


def register(app: typer.Typer, get_settings: Callable[[], Settings]) -> None:
    """Add ``worker`` and ``jobs`` to the ``lungvision`` app."""

    @app.command("worker")
    def worker() -> None:
        """Run the analysis worker: consume studies from the queue, analyse, queue and record results, and
        send them unless a deliverer does (``delivery.by_deliverer``; results first: their queue is taken
        before new studies); its sweeper sends again what a dead process or a lost message left without outcome."""
        from worker.celery_app import configure
        from worker.preload import load_before_fork
        from worker.reconcile import start_sweeper, stop_sweeper

        settings = get_settings()
        celery = configure(settings)
        prepare_store(settings)  # before the pool forks
        load_before_fork(settings)  # ...so that its processes share the model (worker/preload.py)
        sweeper = start_sweeper()
        try:
            celery.worker_main(
                celery_worker_arguments(settings, worker_queues(settings), str(settings.worker.concurrency))
            )
        finally:
            stop_sweeper(sweeper)

    @app.command("deliverer")
    def deliverer() -> None:
        """Run a deliverer: send analysed studies' results (DICOM destinations, HL7 endpoints) with
        ``delivery.deliverer_threads`` threads, each on an association of its own, while the analysis
        workers go on with the next studies. Loads no model. Set ``delivery.by_deliverer`` for the
        workers to leave results to it (``lungvision serve`` and docker compose do)."""
        from common.messages import DELIVERY_QUEUE
        from worker.celery_app import configure
        from worker.result_tasks import store

        settings = get_settings()
        celery = configure(settings, deliverer=True)
        prepare_store(settings)
        store()  # the threads' one store, made before they start
        threads = str(settings.delivery.deliverer_threads)
        celery.worker_main(
            celery_worker_arguments(
                settings, [DELIVERY_QUEUE], threads, "--pool", "threads", "--hostname", "deliverer@%h"
            )
        )

    jobs = typer.Typer(
        help="Dead letters (failed analyses, deliveries that ran out of attempts): list and replay.",
        no_args_is_help=True,
    )
    app.add_typer(jobs, name="jobs")

    def dead_letters():
        from common import audit
        from common.dead_letters import DeadLetters
        from common.store import Store

        settings = get_settings()
        audit.configure(settings.audit.path)  # replays are audited
        return DeadLetters(Store(settings.store.url))

    @jobs.command("failed")
    def failed() -> None:
        """List dead letters, one line each: id, time, destination ("(analysis)" for a failed analysis),
        study round, attempts, error."""
        letters = dead_letters().list()
        if not letters:
            typer.echo("no failed jobs")
        for letter in letters:
            typer.echo(
                f"{letter.id}  {letter.failed_at}  {letter.job.destination}  {letter.job.message_id}  "
                f"attempts={letter.attempts}  {letter.error}"
            )

    @jobs.command("retry")
    def retry(job_id: str = typer.Argument(..., help="id shown by 'lungvision jobs failed'")) -> None:
        """Replay one dead letter (analysis or delivery) with a fresh set of attempts."""
        from common.publisher import Publisher

        publisher = Publisher(get_settings().broker.url)
        try:
            letter = dead_letters().replay(job_id, publisher)
        finally:
            publisher.close()
        if letter is None:
            typer.echo(f"error: no failed job with id {job_id!r} (see 'lungvision jobs failed')", err=True)
            raise typer.Exit(2)
        typer.echo(f"replaying {job_id}: {letter.job.message_id} → {letter.job.destination}")


def prepare_store(settings: Settings) -> None:
    """Create the outcome store's tables once, in the worker's main process before it forks its pool
    (children creating them at once on a fresh SQLite file failed), and move dead letters that earlier
    versions kept in Redis into the store."""
    from common.store import Store
    from worker.deliver import move_legacy_dead_letters

    store = Store(settings.store.url)
    try:
        move_legacy_dead_letters(settings, store)
    finally:
        store.engine.dispose()  # no connection is inherited by the pool's processes


def worker_queues(settings: Settings) -> list[str]:
    """The queues an analysis worker takes from, first things first: results and studies, or studies
    alone when a deliverer sends the results."""
    from common.messages import QUEUE as ANALYSIS_QUEUE
    from worker.queues import CONSUMED_QUEUES

    return [ANALYSIS_QUEUE] if settings.delivery.by_deliverer else list(CONSUMED_QUEUES)


def celery_worker_arguments(settings: Settings, queues: list[str], concurrency: str, *extra: str) -> list[str]:
    """Celery's ``worker`` command line for ``queues`` (without gossip and mingle: our workers need not know
    of each other)."""
    return [
        "worker",
        "--loglevel",
        settings.log_level,
        "--queues",
        ",".join(queues),
        "--concurrency",
        concurrency,
        "--without-gossip",
        "--without-mingle",
        *extra,
    ]
