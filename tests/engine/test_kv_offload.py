"""--kv-offload end to end on the default model: a prompt whose blocks left the pool is
answered from the host tier, and after a restart from the disk tier, exactly as a
local prefix hit answers it; a corrupt disk tier is recomputed; an abort mid-load
loses no block."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.kv_cache_manager import hash_request_tokens
from pagedllm.request import RequestStatus
from tests.conftest import ENGLISH

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
PROMPT = {"prompt_token_ids": list(range(1000, 1200))}  # 12 full blocks and 8 tokens
# three prompts that together need every block of a 40-block pool
OTHERS = [{"prompt_token_ids": [2000 + 7 * k + i % 50 for i in range(300)]} for k in range(3)]


def answer(llm: LLM, prompt=PROMPT):
    [out] = llm.generate([prompt], GREEDY, use_tqdm=False)
    return out


def same_answer(a, b) -> bool:
    return a.outputs[0].token_ids == b.outputs[0].token_ids and [
        lp for lp in a.outputs[0].logprobs
    ] == [lp for lp in b.outputs[0].logprobs]


def offloaded(llm: LLM) -> dict[str, float]:
    return {k: v for k, v in llm.engine.get_metrics().items() if k.startswith("kv_offload")}


def evict(llm: LLM) -> None:
    llm.generate(OTHERS, SamplingParams(max_tokens=1), use_tqdm=False)
    pool = llm.engine.scheduler.kv_cache_manager.block_pool
    first_block = hash_request_tokens(PROMPT["prompt_token_ids"], 16)[0]
    assert pool.get_cached_block(first_block) is None  # handed out for other prompts


def test_host_tier_answers_as_a_local_prefix_hit(tmp_path):
    with LLM(num_kv_blocks=40, kv_offload={"host_gib": 1}) as llm:
        host_tier_answers(llm)


def host_tier_answers(llm: LLM) -> None:
    answer(llm)
    local_hit = answer(llm)
    assert local_hit.num_cached_tokens == 192
    evict(llm)
    loaded = answer(llm)
    assert same_answer(loaded, local_hit)
    metrics = offloaded(llm)
    assert loaded.num_cached_tokens == 192
    assert metrics["kv_offload_blocks_loaded_host"] >= 1 and metrics["kv_offload_loads"] == 1
    assert metrics["kv_offload_blocks_loaded_disk"] == 0
    llm.engine.check_invariants()


def test_disk_tier_outlives_the_engine_and_a_corrupt_one_is_recomputed(tmp_path):
    config = {"host_gib": 0, "disk_path": str(tmp_path)}
    first = LLM(num_kv_blocks=40, kv_offload=config)
    computed = answer(first)
    local_hit = answer(first)
    first.close()
    restarted = LLM(num_kv_blocks=40, kv_offload=config)
    from_disk = answer(restarted)
    assert from_disk.num_cached_tokens == 192 and same_answer(from_disk, local_hit)
    assert offloaded(restarted)["kv_offload_blocks_loaded_disk"] == 12
    restarted.close()
    files = list(tmp_path.glob("*/*.kv"))
    assert len(files) == 12  # the prompt's blocks (the answer adds 15 tokens: no full block)
    for path in files:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    damaged = LLM(num_kv_blocks=40, kv_offload=config)
    recomputed = answer(damaged)
    assert recomputed.num_cached_tokens == 0 and same_answer(recomputed, computed)
    assert offloaded(damaged)["kv_offload_load_failures"] == 1
    damaged.close()


def test_an_abort_mid_load_frees_every_block():
    llm = LLM(num_kv_blocks=40, kv_offload={"host_gib": 1})
    answer(llm)
    evict(llm)
    engine = llm.engine
    engine.add_request("loads", PROMPT, GREEDY)
    engine.add_request("runs", {"prompt_token_ids": [5] * 50}, GREEDY)
    engine.step()
    request = engine.scheduler.get_request("loads")
    assert request is not None and request.status in (
        RequestStatus.WAITING_FOR_REMOTE_KV,
        RequestStatus.RUNNING,
    )
    engine.abort_request("loads")
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_invariants()
    pool = engine.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_blocks
    engine.close()


def test_offload_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        LLM(kv_offload={"host_gib": 1}, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="host_gib > 0 or a disk_path"):
        LLM(kv_offload={"host_gib": 0})
    with pytest.raises(ValueError, match="unknown"):
        LLM(kv_offload='{"host_gb": 1}')
    assert ENGLISH  # the shared text is importable (fixtures load lazily)
