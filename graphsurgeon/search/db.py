"""The policy database: studies, policies, metrics, lineage, Pareto flags, errors.

SQLAlchemy over any URL (``sqlite:///DIR/search.db`` by default; PostgreSQL for search across
machines). Every evaluation is committed on its own, so a run killed with ``kill -9`` loses
only evaluations still in flight; ``--resume`` picks the study up where it stopped. Results are
also a cache: an evaluation is looked up by (context hash, policy key, profile key) across
studies before it is run again.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from graphsurgeon.errors import GraphSurgeonError


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    model_path: Mapped[str] = mapped_column(Text)
    context_hash: Mapped[str] = mapped_column(String(64))
    profile_key: Mapped[str] = mapped_column(String(200))
    strategy: Mapped[str] = mapped_column(String(50))
    objectives: Mapped[list] = mapped_column(JSON)
    config: Mapped[dict] = mapped_column(JSON)  # EvalConfig, tune options, the space summary
    strategy_state: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="running")  # running|done
    policies: Mapped[list[PolicyRow]] = relationship(back_populates="study")


class PolicyRow(Base):
    __tablename__ = "policies"
    __table_args__ = (UniqueConstraint("study_id", "key", "stage"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    stage: Mapped[str] = mapped_column(String(20), default="search")  # search|measured|baseline
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)  # baselines
    policy: Mapped[dict] = mapped_column(JSON)
    vector: Mapped[list | None] = mapped_column(JSON, nullable=True)
    parents: Mapped[list] = mapped_column(JSON, default=list)  # lineage: parent policy ids
    generation: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(20))  # ok|failed|infeasible
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    pareto: Mapped[bool] = mapped_column(Boolean, default=False)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    eval_s: Mapped[float] = mapped_column(Float, default=0.0)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    context_hash: Mapped[str] = mapped_column(String(64), index=True)
    profile_key: Mapped[str] = mapped_column(String(200))
    study: Mapped[Study] = relationship(back_populates="policies")
    metrics: Mapped[list[MetricRow]] = relationship(
        back_populates="policy_row", cascade="all, delete-orphan"
    )

    def values(self) -> dict[str, float]:
        return {m.name: m.value for m in self.metrics}

    def kinds(self) -> dict[str, str]:
        return {m.name: m.kind for m in self.metrics if m.kind}


class MetricRow(Base):
    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    kind: Mapped[str | None] = mapped_column(String(100), nullable=True)
    policy_row: Mapped[PolicyRow] = relationship(back_populates="metrics")


def default_url(out_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'search.db'}"


class PolicyDB:
    """Thin access layer; every write commits."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine: Engine = create_engine(url)
            if url.startswith("sqlite"):
                event.listen(self.engine, "connect", _sqlite_pragmas)
            Base.metadata.create_all(self.engine)
        except (SQLAlchemyError, ImportError) as e:
            raise GraphSurgeonError(f"--storage {url}: {str(e).splitlines()[0]}") from None
        self.session = Session(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.session.close()
        self.engine.dispose()

    # -- studies -----------------------------------------------------------------------
    def study(self, name: str) -> Study | None:
        return self.session.scalars(select(Study).where(Study.name == name)).first()

    def studies(self) -> list[Study]:
        return list(self.session.scalars(select(Study).order_by(Study.id)))

    def create_study(self, **fields: Any) -> Study:
        study = Study(**fields)
        self.session.add(study)
        self.session.commit()
        return study

    def save_state(self, study: Study, state: dict[str, Any]) -> None:
        study.strategy_state = json.loads(json.dumps(state, default=_jsonable))
        self.session.commit()

    def finish(self, study: Study) -> None:
        study.status = "done"
        self.session.commit()

    # -- policies ----------------------------------------------------------------------
    def add(
        self,
        study: Study,
        *,
        key: str,
        policy: dict[str, Any],
        result: dict[str, Any],
        stage: str = "search",
        name: str | None = None,
        vector: list[float] | None = None,
        parents: list[int] | None = None,
        generation: int = 0,
        cached: bool = False,
        status: str | None = None,
    ) -> PolicyRow:
        row = PolicyRow(
            study=study,
            key=key,
            stage=stage,
            name=name,
            policy=policy,
            vector=vector,
            parents=parents or [],
            generation=generation,
            status=status or result["status"],
            error=result.get("error"),
            cached=cached,
            eval_s=float(result.get("eval_s", 0.0)),
            context_hash=study.context_hash,
            profile_key=study.profile_key,
        )
        kinds = result.get("kinds", {})
        for metric, value in {**result.get("metrics", {}), **result.get("objectives", {})}.items():
            row.metrics.append(MetricRow(name=metric, value=float(value), kind=kinds.get(metric)))
        self.session.add(row)
        self.session.commit()
        return row

    def rows(self, study: Study, stage: str | None = None) -> list[PolicyRow]:
        query = select(PolicyRow).where(PolicyRow.study_id == study.id)
        if stage is not None:
            query = query.where(PolicyRow.stage == stage)
        return list(self.session.scalars(query.order_by(PolicyRow.id)))

    def get(self, policy_id: int) -> PolicyRow | None:
        return self.session.get(PolicyRow, policy_id)

    def cached(
        self, context_hash: str, key: str, profile_key: str, stage: str = "search"
    ) -> PolicyRow | None:
        """A finished evaluation of the same policy on the same model, data and profile."""
        query = (
            select(PolicyRow)
            .where(
                PolicyRow.context_hash == context_hash,
                PolicyRow.key == key,
                PolicyRow.profile_key == profile_key,
                PolicyRow.stage == stage,
            )
            .order_by(PolicyRow.id)
        )
        return self.session.scalars(query).first()

    def set_pareto(self, rows: list[PolicyRow], flags: list[bool]) -> None:
        for row, flag in zip(rows, flags, strict=True):
            row.pareto = bool(flag)
        self.session.commit()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # a reader never blocks the search's commits
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives kill -9
    cursor.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def result_of(row: PolicyRow) -> dict[str, Any]:
    """The evaluation result stored in ``row`` (as :class:`EvalResult.to_dict` gives it)."""
    objectives = {"accuracy_drop", "latency_ms", "size_bytes", "energy_mj", "robustness_drop"}
    values = row.values()
    return {
        "key": row.key,
        "status": "failed" if row.status == "failed" else "ok",
        "objectives": {k: v for k, v in values.items() if k in objectives},
        "metrics": {k: v for k, v in values.items() if k not in objectives},
        "kinds": row.kinds(),
        "error": row.error,
        "eval_s": row.eval_s,
    }
