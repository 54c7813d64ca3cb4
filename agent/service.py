"""`fund-agent run`: the unattended service.

APScheduler 3 BlockingScheduler in the main thread, one job per policy, rebuilt when policy files change;
migrations and reconciliation at start; a lock so that one ledger has one agent; SIGTERM/SIGINT stop between
transfers (running jobs finish), SIGHUP reloads; /healthz, /metrics and the EA's intake on loopback;
notifications from the outbox on their own thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger

from agent import logs
from agent.broker.errors import BrokerError
from agent.config import Config, ConfigError
from agent.cronspec import crontab_trigger
from agent.engine.tick import Engine, TickOutcome
from agent.equity.base import NoReading
from agent.instance_lock import InstanceLock, LockHeld, new_owner_id
from agent.ledger import queries
from agent.ledger.db import Ledger, sqlite_path
from agent.ledger.leases import Leases
from agent.policy.evaluate import Decision
from agent.policy.load import Problem, load_policies, policy_files
from agent.policy.model import Policy
from agent.safe_io import UnsafeInput, read_small_file
from agent.timeutil import Clock

log = logging.getLogger("agent.service")
HEARTBEAT_EVERY = 60.0
HEALTH_SLACK = timedelta(seconds=30)


class ServiceError(Exception):
    pass


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    evaluations: int = 0
    job_errors: int = 0
    jobs_missed: int = 0
    reloads_ok: int = 0
    reloads_failed: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)  # account -> unix time
    last_equity: dict[str, Decimal] = field(default_factory=dict)


class Service:
    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or Clock()
        self.stats = Stats()
        self.policies: dict[str, Policy] = {}  # account -> policy in force
        self.by_path: dict[str, Policy] = {}  # file -> last good policy from it
        self.file_digests: dict[str, str] = {}
        self.reported: dict[str, str] = {}  # file -> digest of the broken text already reported
        self.scheduler = BlockingScheduler(timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1})
        self.lock: InstanceLock | None = None
        self.owner = new_owner_id()  # replaced by the lock's owner id when the ledger is a SQLite file
        self.ledger: Ledger | None = None
        self.engine: Engine | None = None
        self.http: Any = None
        self.notifier: Any = None
        self._reload_lock = threading.Lock()
        self._stopping = threading.Event()
        self.leases: Leases | None = None  # several hosts on one ledger (PostgreSQL): who acts on which account
        self._lease_thread: threading.Thread | None = None
        # Readings that arrive between ticks (EA POSTs, status file rewrites) bring an evaluation forward
        # (agent/equity/watch.py); one lock per account keeps it from overlapping a scheduled tick.
        self._account_locks: dict[str, threading.Lock] = {}
        self._account_locks_guard = threading.Lock()
        self.reactor: Any = None
        self.watcher: Any = None
        self.triggers: Any = None
        self._last_said: dict[str, tuple[str, str | None, str]] = {}  # per account: the last decision logged
        self._by_digits: tuple[dict[str, Policy], dict[str, Policy]] | None = None

    # ---- start ----

    def start(self) -> None:
        from agent.wiring import make_broker, make_leases, make_reconciler, make_source

        path = sqlite_path(self.config.database)
        if path is not None:
            self.lock = InstanceLock(path, "run")
            try:
                self.lock.acquire()
            except LockHeld as exc:
                raise ServiceError(str(exc)) from None
            self.owner = self.lock.owner
        self.ledger = Ledger.open(self.config.database, password_env=self.config.database_password_env)
        broker = make_broker(self.config)
        logs.register_secret(self.config.broker.token())
        source = make_source(self.config, self.clock, broker)
        intake = None
        if self.config.http:
            from agent.equity.intake import IntakeStore, WithIntake

            intake = IntakeStore()
            intake.subscribe(self._on_posted)
            source = WithIntake(source, intake)
        # This process holds the lock (or the ledger has no lock file): every other owner of an in-flight row is
        # gone, and the transfers it creates carry its owner id.
        from agent.wiring import LedgerAccess

        if path is None:  # a shared ledger: accounts are acted on under leases (agent/ledger/leases.py)
            self.leases = make_leases(self.config, self.ledger, self.owner)
        reconciler = make_reconciler(self.config, self.ledger, broker, self.clock,
                                     LedgerAccess(owner=self.owner), leases=self.leases)
        self.engine = Engine(self.ledger, broker, source, self.clock, on_outcome=self._note,
                             reconciler=reconciler, leases=self.leases)
        try:
            broker.connect()
            if self.leases is None:
                for verdict in reconciler.run():
                    log.warning("reconcile at start: %s", verdict)
        except BrokerError as exc:
            if exc.needs_operator:
                raise ServiceError(f"the broker refused the agent: {exc}") from None
            log.warning("broker not reachable at start (%s); evaluations go on, transfers wait", exc.code)
        self.reload(initial=True)
        if not self.policies:
            raise ServiceError(f"no valid policy in {self.config.policies}")
        if self.leases is not None:
            # leases for the policies just loaded, renewed from now on by their own thread, before any slow
            # start-up work (a statement read may take a broker timeout): a lease must never lapse for that
            self._sync_leases(initial=True)
            self._lease_thread = threading.Thread(target=self._lease_loop, name="leases", daemon=True)
            self._lease_thread.start()
            for account in sorted(self.leases.held()):
                try:
                    for verdict in reconciler.run(account):
                        log.warning("reconcile at start: %s", verdict)
                except BrokerError as exc:
                    log.warning("reconcile of %s at start failed: %s", account, exc.code)
        self._start_reactor()
        self._start_http(intake)
        self._start_notifier()
        self.scheduler.add_listener(self._on_job_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        if self.config.reload_every > 0:
            self.scheduler.add_job(self.reload, IntervalTrigger(seconds=self.config.reload_every), id="reload",
                                   misfire_grace_time=None)
        self.scheduler.add_job(self._heartbeat, IntervalTrigger(seconds=HEARTBEAT_EVERY), id="heartbeat",
                               misfire_grace_time=None)

    # ---- leases (several hosts) ----

    def _wanted_accounts(self) -> set[str]:
        wanted = set(self.policies)
        if self.ledger is not None:  # accounts with open transfers and no policy any more: someone must settle them
            with self.ledger.reader() as session:
                wanted |= {t.account for t in queries.unresolved(session)}
        return wanted

    def _lease_loop(self) -> None:
        assert self.leases is not None
        while not self._stopping.wait(self.leases.renew_every):
            self._sync_leases()

    def _sync_leases(self, initial: bool = False) -> None:
        assert self.leases is not None
        try:
            claimed, _lost = self.leases.sync(self._wanted_accounts())
        except Exception as exc:  # noqa: BLE001 - logged by Leases; acting on nothing until it succeeds
            log.debug("lease sync failed: %s", type(exc).__name__)
            return
        if initial or self.engine is None:
            return
        # Taken over: evaluate now. The evaluation reconciles what the old holder left before it decides; this
        # thread does no broker I/O, so that renewals are never late.
        for account in sorted(claimed):
            job = self.scheduler.get_job(f"policy:{account}") if self.scheduler.running else None
            if job is not None:
                job.modify(next_run_time=datetime.now().astimezone())
            elif account not in self.policies:  # an orphan with an open transfer: the heartbeat reconciles it
                log.info("took over %s (no policy here): its open transfers are reconciled by the heartbeat",
                         account)

    def _start_http(self, intake: Any) -> None:
        if not self.config.http:
            return
        from agent.http_api import HttpApi, parse_listen
        from agent.status_page import render_for_service

        settings = self.config.http
        token = None
        token_env = settings.get("status_token_env")
        if token_env:  # the status page and /metrics need it; with it the listener may leave loopback
            token = os.environ.get(str(token_env), "").strip() or None
            if token is None:
                raise ConfigError(f"environment variable {token_env} is not set: it must hold the status page's "
                                  "bearer token")
            logs.register_secret(token)
        listen = parse_listen(str(settings.get("listen", "127.0.0.1:8787")),
                              bool(settings.get("allow_remote")) or token is not None)
        secret = None
        env = settings.get("intake_secret_env")
        if env:
            secret = os.environ.get(str(env), "").strip() or None
            if secret is None:
                raise ConfigError(f"environment variable {env} is not set: it must hold the EA intake secret")
            logs.register_secret(secret)
        # a status for a login no policy manages is refused (404) and counted, never stored
        self.http = HttpApi(listen, self.health, self.metrics, intake, secret,
                            managed=lambda: {p.mt5_digits for p in self.policies.values()},
                            page=lambda: render_for_service(self), token=token)
        self.http.start()
        log.info("http endpoint on %s:%d (/ status page, /healthz, /metrics%s)", listen[0], self.http.port,
                 ", POST /status" if secret else "")

    def _start_notifier(self) -> None:
        if not self.config.notify:
            return
        from agent.notify import Notifier, Outbox, channels_from_config

        assert self.ledger is not None
        channels = channels_from_config(self.config.notify)
        self.notifier = Notifier(Outbox(self.ledger, channels, self.clock))
        self.notifier.outbox.collect()  # sets the cursors before anything new happens
        self.notifier.start()

    # ---- policies ----

    def _files(self) -> list[Path]:
        location = self.config.policies
        return policy_files(location) if location.exists() else []

    def reload(self, initial: bool = False) -> bool:
        """Validate changed files and swap them in; a broken file keeps its last good policy in force."""
        with self._reload_lock:
            files = self._files()
            digests = {}
            for path in files:
                try:
                    # bounded, regular files only: a FIFO or /dev/zero swapped in never blocks the reload
                    digests[str(path)] = hashlib.sha256(read_small_file(path, 1 << 20)).hexdigest()
                except (OSError, UnsafeInput):
                    digests[str(path)] = "unreadable"
            if not initial and digests == self.file_digests:
                return False
            policies, problems = load_policies(files)
            broken: dict[str, list[Problem]] = {}
            for problem in problems:
                broken.setdefault(problem.path, []).append(problem)
            new_by_path = {p.path: p for p in policies}
            for path_text, its_problems in broken.items():
                old = self.by_path.get(path_text)
                if old is not None:
                    new_by_path[path_text] = old  # the last good policy stays in force
                if self.reported.get(path_text) != digests.get(path_text):
                    self.reported[path_text] = digests.get(path_text, "")
                    self._report_reload_failure(path_text, its_problems, old)
            for path_text in list(self.reported):
                if path_text not in broken:
                    del self.reported[path_text]
            accounts: dict[str, Policy] = {}
            for policy in new_by_path.values():
                if policy.mt5 in accounts:  # a kept old policy clashing with a new file: keep the new one
                    continue
                accounts[policy.mt5] = policy
            changed = {a: p.sha256 for a, p in accounts.items()} != {a: p.sha256 for a, p in self.policies.items()}
            self.by_path = new_by_path
            self.policies = accounts
            self.file_digests = digests
            if broken:
                self.stats.reloads_failed += 1
            elif not initial:
                self.stats.reloads_ok += 1
            if changed or initial:
                self._rebuild_jobs()
                if not initial:
                    log.info("policies reloaded: %s", ", ".join(f"{p.name}@{p.sha256[:12]}"
                                                               for p in accounts.values()))
            return changed

    def _report_reload_failure(self, path: str, problems: list[Problem], old: Policy | None) -> None:
        text = "; ".join(str(p) for p in problems)
        kept = f"policy {old.name}@{old.sha256[:12]} stays in force" if old else "no earlier policy from this file"
        log.error("policy reload failed: %s (%s)", text, kept)
        assert self.ledger is not None
        with self.ledger.session() as session:
            queries.record_decision(session, self.clock.now(), old.mt5 if old else "?",
                                    old.name if old else Path(path).stem, old.sha256 if old else None,
                                    Decision("none", None, f"policy reload failed: {text}; {kept}",
                                             bound_by="policy_reload"),
                                    old.currency if old else None, None, None, action="error")
            session.commit()

    def _rebuild_jobs(self) -> None:
        for job in self.scheduler.get_jobs():
            if job.id.startswith("policy:"):
                job.remove()
        for account, policy in self.policies.items():
            if policy.schedule.cron:
                trigger: Any = crontab_trigger(policy.schedule.cron, timezone="UTC")
                grace = 60
            else:
                assert policy.schedule.every is not None
                seconds = policy.schedule.every.total_seconds()
                trigger = IntervalTrigger(seconds=seconds, timezone="UTC")
                grace = int(max(1, min(seconds, 300)))
            self.scheduler.add_job(self._evaluate, trigger, args=[account], id=f"policy:{account}",
                                   name=f"{policy.name} ({account})", misfire_grace_time=grace,
                                   next_run_time=datetime.now().astimezone())

    # ---- work ----

    def _evaluate(self, account: str) -> None:
        if self._stopping.is_set():
            return
        with self._account_lock(account):  # a scheduled tick and a reading-triggered one never overlap
            policy = self.policies.get(account)
            if policy is None or self.engine is None or self._stopping.is_set():
                return
            with logs.log_context(account=account, policy=policy.name):
                self.engine.tick_safely(policy)

    def _account_lock(self, account: str) -> threading.Lock:
        with self._account_locks_guard:
            lock = self._account_locks.get(account)
            if lock is None:
                lock = self._account_locks[account] = threading.Lock()
            return lock

    # ---- readings between ticks ----

    def _start_reactor(self) -> None:
        from agent.equity.watch import FolderWatcher, Reactor, Triggers

        self.triggers = Triggers()
        self.reactor = Reactor(self._evaluate)
        if self.config.equity.source == "ea-file" and self.config.equity.dir is not None:
            self.watcher = FolderWatcher(Path(self.config.equity.dir), self._on_status_file)
            log.info("watching %s for status files (%s)", self.config.equity.dir, self.watcher.mode)

    def _policy_for_digits(self, digits: str) -> Policy | None:
        policies = self.policies  # a reload swaps in a new dict: the index follows it
        index = self._by_digits
        if index is None or index[0] is not policies:
            index = self._by_digits = (policies, {p.mt5_digits: p for p in policies.values()})
        return index[1].get(digits)

    def _react(self, policy: Policy, equity: Decimal) -> None:
        if self.reactor is not None and not self._stopping.is_set() and self.triggers.reading(policy, equity):
            self.reactor.poke(policy.mt5)

    def _on_posted(self, snapshot: Any) -> None:
        """The EA POSTed a status (HTTP thread): a reading across a band is evaluated now, not at the next tick."""
        try:
            policy = self._policy_for_digits(snapshot.login)
            if policy is not None and snapshot.connected:
                self._react(policy, snapshot.equity)
        except Exception as exc:  # noqa: BLE001 - the status is taken; the schedule still evaluates it
            log.warning("could not react to a POSTed status: %s", type(exc).__name__)

    def _on_status_file(self, digits: str) -> None:
        """A status file was written (watcher thread): read it as the engine would and react to it."""
        policy = self._policy_for_digits(digits)
        if policy is None or self.engine is None:
            return
        try:
            snapshot = self.engine.source.read(policy.mt5, policy.schedule.max_equity_age.total_seconds())
        except NoReading:
            return  # torn, stale or disconnected: the next write or the schedule tells
        self._react(policy, snapshot.equity)

    def _note(self, outcome: TickOutcome) -> None:
        if self.triggers is not None:
            self.triggers.evaluated(outcome.policy, outcome.snapshot.equity if outcome.snapshot else None,
                                    outcome.had_reading,
                                    outcome.transfer is not None and outcome.transfer["state"] == "confirmed")
        if outcome.decision.bound_by == "lease" and outcome.snapshot is None:
            # another agent holds the account: its evaluation counts there, not here
            self.stats.last_eval[outcome.policy.mt5] = time.time()
            return
        self.stats.evaluations += 1
        self.stats.last_eval[outcome.policy.mt5] = time.time()
        if outcome.snapshot is not None:
            self.stats.last_equity[outcome.policy.mt5] = outcome.snapshot.equity
        decision = outcome.decision
        extra = ""
        if outcome.transfer is not None:
            logs.add_context(transfer=outcome.transfer["id"])
            extra = f" -> transfer {outcome.transfer['id']} {outcome.transfer['state']}"
        level = logging.INFO if outcome.transfer is None or outcome.transfer["state"] == "confirmed" \
            else logging.WARNING
        said = (decision.action, decision.bound_by, decision.reason)
        if outcome.transfer is None and decision.action == "none" and self._last_said.get(outcome.policy.mt5) == said:
            level = logging.DEBUG  # the same nothing-to-do as last time (the journal has it): one line, not one a tick
        self._last_said[outcome.policy.mt5] = said
        log.log(level, "%s %s%s: %s", decision.action, decision.amount if decision.amount is not None else "",
                extra, decision.reason)

    def _on_job_event(self, event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            self.stats.jobs_missed += 1
            log.warning("job %s missed its run at %s (the agent was busy or asleep)", event.job_id,
                        event.scheduled_run_time)
        else:
            self.stats.job_errors += 1
            log.error("job %s failed: %s", event.job_id, logs.redact(repr(event.exception)),
                      exc_info=(type(event.exception), event.exception, event.exception.__traceback__)
                      if event.exception else None)

    def _heartbeat(self) -> None:
        connected = bool(self.engine and self.engine.broker and self.engine.broker.connected)
        log.info("heartbeat: %d policies, %d evaluations, broker %s", len(self.policies), self.stats.evaluations,
                 "connected" if connected else "disconnected")
        self._reconcile_orphans()
        self._seal_ended_runs()

    def _seal_ended_runs(self) -> None:
        """Chain the runs of no-op evaluations whose hour is over (agent/ledger/journal.py) without waiting for
        their account's next evaluation."""
        if self.ledger is None:
            return
        try:
            with self.ledger.journal_session() as session:
                sealed = queries.seal_ended_runs(session, self.clock.now())
                session.commit()
        except Exception as exc:  # noqa: BLE001 - the next heartbeat tries again; evaluations go on meanwhile
            log.warning("could not end the journal's finished runs: %s", logs.redact(str(exc))[:200])
            return
        if sealed:
            log.debug("ended %d runs of no-op evaluations", sealed)

    def _reconcile_orphans(self) -> None:
        """Unresolved transfers of accounts that no policy in force evaluates (a policy removed or renamed while
        one was open) would otherwise wait for a restart: each account's own evaluation reconciles the rest."""
        if self.engine is None or self.engine.reconciler is None or self.ledger is None:
            return
        with self.ledger.reader() as session:
            orphans = sorted({t.account for t in queries.unresolved(session)} - set(self.policies))
        if self.leases is not None:
            orphans = [a for a in orphans if self.leases.holds(a)]
        for account in orphans:
            try:
                for verdict in self.engine.reconciler.run(account):
                    log.warning("reconcile (no policy in force for %s): %s", account, verdict)
            except BrokerError as exc:
                log.warning("reconcile of %s failed: %s", account, exc.code)

    # ---- health and metrics ----

    def _allowed_age(self, policy: Policy) -> timedelta:
        if policy.schedule.every is not None:
            return policy.schedule.every * 2 + HEALTH_SLACK
        trigger = crontab_trigger(policy.schedule.cron or "* * * * *", timezone="UTC")
        now = datetime.now().astimezone()
        first = trigger.get_next_fire_time(None, now)
        second = trigger.get_next_fire_time(first, first + timedelta(seconds=1)) if first else None
        gap = (second - first) if first and second else timedelta(days=1)
        return gap * 2 + HEALTH_SLACK

    def health(self) -> tuple[bool, dict[str, Any]]:
        now = time.time()
        accounts = {}
        ok = True
        for account, policy in self.policies.items():
            last = self.stats.last_eval.get(account)
            age = now - (last if last is not None else self.stats.started)
            fresh = age <= self._allowed_age(policy).total_seconds()
            ok = ok and fresh
            accounts[account] = {"policy": policy.name, "last_evaluation_age_s": round(age, 1) if last else None,
                                 "healthy": fresh}
        ok = ok and bool(self.policies)
        return ok, {"status": "ok" if ok else "unhealthy", "accounts": accounts}

    def metrics(self) -> str:
        from agent.metrics import render_metrics

        return render_metrics(self)

    # ---- run and stop ----

    def run(self) -> int:
        def stop(signum: int, _frame: Any) -> None:
            log.info("signal %s: stopping after the work in hand", signal.Signals(signum).name)
            self._stopping.set()
            if self.scheduler.running:
                self.scheduler.shutdown(wait=False)

        def hup(_signum: int, _frame: Any) -> None:
            threading.Thread(target=self.reload, name="sighup-reload", daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, hup)
        log.info("fund-agent running: %d policies (%s)", len(self.policies),
                 ", ".join(f"{p.name}@{p.mt5}" for p in self.policies.values()))
        try:
            self.scheduler.start()
        finally:
            self.close()
        return 0

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        if self.reactor is not None:
            self.reactor.close()  # an evaluation it started finishes first
        executor = self.scheduler._executors.get("default")  # noqa: SLF001 - no public way to wait for jobs
        if executor is not None and getattr(executor, "_pool", None) is not None:
            executor.shutdown(wait=True)  # a transfer in flight finishes and is recorded before we exit
        if self.http is not None:
            self.http.stop()
        if self.notifier is not None:
            self.notifier.stop()
        if self.engine is not None:
            if self.engine.broker is not None:
                self.engine.broker.close()
            self.engine.source.close()
        self._stopping.set()
        if self._lease_thread is not None:
            self._lease_thread.join(timeout=10)
        if self.leases is not None:
            self.leases.release_all()  # another host takes over at once instead of after the lease expires
        if self.ledger is not None:
            self.ledger.close()
        if self.lock is not None:
            self.lock.release()
        log.info("fund-agent stopped")


def serve(config: Config) -> int:
    logs.setup()
    service = Service(config)
    try:
        service.start()
    except Exception:
        service.close()
        raise
    return service.run()
