"""Settings from SEDD_* environment variables (pydantic-settings): the one reading of the environment.

`ModelSettings` holds what loading a model takes (source, device, dtype and the load options); every
`sedd` subcommand that loads a model builds one, so a variable means the same to `sedd sample`,
`sedd train`, `sedd bench` and the server. `Settings` adds the server's own fields and serves
`sedd serve`, `uvicorn app.main:create_app` and Ray replicas. The library (sedd_core) reads no
environment variable: these models pass values down as arguments. An empty variable counts as unset.
This module imports no torch, so that `sedd --help` stays quick.

Defaults suit a demo. SEDD_MAX_ROWS is the GPU memory budget of one model pass: see the memory
table in docs/deployment.md (16 rows of SEDD-large fit a 24 GB card; the Docker images set 16).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MAX_SAMPLES = 16
SWITCH_OFF = ("", "0", "false", "no", "off", "n", "f")
SWITCH_ON = ("1", "true", "yes", "on", "y", "t")


def compile_mode(switch: str | bool | None) -> str | None:
    """FastSEDD's `compile` from a switch as people write it (SEDD_COMPILE, --compile): unset, 0, false,
    no or off is None (eager); 1, true, yes or on is "freeze" (Inductor, weights frozen in); other
    text names a torch.compile mode."""
    text = "" if switch is None else str(switch).strip().lower()
    if text in SWITCH_OFF:
        return None
    return "freeze" if text in SWITCH_ON else text


class ModelSettings(BaseSettings):
    """Which model to load, where, and how: SEDD_MODEL, SEDD_DEVICE, SEDD_DTYPE, SEDD_ALLOW_PICKLE,
    SEDD_CACHE, SEDD_OXEN_HOST, SEDD_GPT2_VOCAB, SEDD_COMPILE."""

    model_config = SettingsConfigDict(env_prefix="SEDD_", extra="ignore", validate_default=True, env_ignore_empty=True)

    model: str = Field("default", description="model source: a folder, 'default', 'oxen:NS/REPO' or 'hf:REPO'")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str | None = Field(None, description="float32, bfloat16 or float16; unset or auto = bf16 on CUDA and on "
                              "CPUs with native bf16 (AVX512-BF16, AMX), float32 on other CPUs")
    compile: str | None = Field(None, description="torch.compile the network: 1 (Inductor, weights frozen in), "
                                "auto (that on a CPU with a C++ compiler, else eager; `make serve` sets it), "
                                "or a torch.compile mode such as reduce-overhead; unset or 0 = eager")
    allow_pickle: bool = Field(False, description="let checkpoints that need full unpickling load (runs code from "
                               "the file: only for files you trust)")
    cache: Path | None = Field(None, description="where hub sources are downloaded; unset = ~/.cache/sedd")
    oxen_host: str | None = Field(None, description="Oxen hub host for oxen: sources; unset = hub.oxen.ai")
    gpt2_vocab: Path | None = Field(None, description="a gpt2.tiktoken file for GPT-2 models, instead of "
                                    "tiktoken's download")

    @field_validator("dtype", mode="before")
    @classmethod
    def _auto_dtype(cls, value):
        if value is None or str(value).strip().lower() in ("", "auto", "none"):
            return None
        return str(value).strip()

    _compile_mode = field_validator("compile", mode="before")(compile_mode)

    def load_options(self) -> dict[str, Any]:
        """Keyword arguments of `sedd_core.load` besides the source, device and dtype."""
        return {"allow_pickle": self.allow_pickle, "cache_dir": self.cache, "gpt2_vocab": self.gpt2_vocab,
                "oxen_host": self.oxen_host, "compile": self.compile}


class Settings(ModelSettings):
    """The server: the model it loads, and its limits, security, streaming and shutdown."""

    max_rows: int = Field(16, ge=1, le=4096, description="rows (samples) in one model pass, over all requests; "
                          "16 fits SEDD-large on a 24 GB GPU (docs/deployment.md)")
    max_queue: int = Field(64, ge=0, description="requests that may wait for rows; more get 503")
    max_steps: int = Field(1024, ge=1, description="most denoising steps one request may ask for")
    max_samples: int | None = Field(None, ge=1, description="most samples one request may ask for; unset = "
                                    "16 or max_rows if smaller; may not exceed max_rows")
    max_score_samples: int = Field(1024, ge=1, description="most Monte-Carlo samples one POST /v1/score request "
                                   "may ask for")
    api_key: SecretStr | None = Field(None, description="bearer token for generation, /v1/model and /metrics")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS; empty = no CORS headers")
    max_body_bytes: int = Field(64 * 1024, ge=256, description="largest request body accepted (413 above)")
    stream_heartbeat_s: float = Field(15.0, gt=0, description="seconds between SSE keep-alive comments")
    drain_timeout_s: float = Field(20.0, ge=0, description="on shutdown, seconds to let running requests finish")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; unset = on CPU every core "
                                      "the process may use (its CPU affinity), on CUDA torch's own")
    warmup: bool = Field(True, description="run one short generation before reporting ready")
    log_level: str = Field("info", description="level of the sedd.* loggers")
    replica_id: str | None = Field(None, description="this server's name in the X-Replica-ID header and GET "
                                   "/v1/model; unset = HOST:PID (under Ray Serve: the replica's id)")
    fault_injection: bool = Field(False, description="test-only (docs/reliability.md): expose POST /_faults, "
                                  "which makes the next model passes fail; never set it in production")

    @field_validator("torch_threads", mode="before")
    @classmethod
    def _auto_threads(cls, value):
        if value is None or str(value).strip().lower() in ("", "auto"):
            return None
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key(cls, value):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            return [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
        return [str(origin).strip().rstrip("/") for origin in value if str(origin).strip()]

    @field_validator("replica_id", mode="before")
    @classmethod
    def _empty_replica(cls, value):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return str(value).strip()

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError("log_level must be one of critical, error, warning, info, debug, trace")
        return value

    @model_validator(mode="after")
    def _samples_fit_a_pass(self) -> Settings:
        if self.max_samples is None:
            self.max_samples = min(DEFAULT_MAX_SAMPLES, self.max_rows)
        elif self.max_samples > self.max_rows:
            raise ValueError(
                f"SEDD_MAX_SAMPLES ({self.max_samples}) must not exceed SEDD_MAX_ROWS ({self.max_rows}): "
                "one request's samples run in one pass"
            )
        return self
