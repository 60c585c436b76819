"""A fake paged model that drives the scheduler in its tests: each step writes every fed token
into the pages its chunk's page table names (per layer) and samples the next token from the
context it reads BACK from those pages, so wrong page tables, pages shared by mistake, or
prefix-cache hits with the wrong content change the outputs, which must equal a direct
computation (`reference_output`). Used by test_scheduler.py and test_scheduler_policies.py.
"""
from crosspool_jax.engine.request import Request, RequestStatus
from crosspool_jax.engine.scheduler import Scheduler, SchedulerConfig
from crosspool_jax.kv.allocator import PageAllocator
from crosspool_jax.kv.kv_cache_manager import KVCacheManager, ModelKVGeometry
from crosspool_jax.sampling_params import SamplingParams

EOS = 3
GEOMETRIES = {"a": ModelKVGeometry("a", num_layers=2, tokens_per_page=4, max_model_len=64),
              "b": ModelKVGeometry("b", num_layers=3, tokens_per_page=2, max_model_len=48)}


def next_token(model, context):
    """The fake model: a deterministic function of the whole context."""
    salt = 7 if model == "a" else 13
    return (sum((i + salt) * t for i, t in enumerate(context)) * 31 + len(context)) % 50 + 1


def reference_output(model, prompt, max_tokens, max_model_len, stop_at_eos=True):
    tokens, out = list(prompt), []
    while True:
        t = next_token(model, tokens)
        out.append(t)
        tokens.append(t)
        if (stop_at_eos and t == EOS) or len(out) >= max_tokens or len(tokens) >= max_model_len:
            return out


class FakeEngine:
    """Runs SchedulerOutputs against a simulated paged KV store and applies stop rules."""

    def __init__(self, scheduler, stop_at_eos=True):
        self.sched = scheduler
        self.kv = scheduler.kv
        self.store = {}                       # (page, slot) -> (token, position, layer, context digest)
        self.stop_at_eos = stop_at_eos
        self.outputs = []
        self.finished = {}                    # request_id -> Request

    def _write(self, chunk, pos, token, context):
        # Like real K/V, what is stored depends on the whole context up to the token.
        g = self.kv.geometry(chunk.request.model)
        block, slot = divmod(pos, g.tokens_per_page)
        digest = hash(tuple(context[:pos]) + (token,))
        for layer in range(g.num_layers):
            page = chunk.page_table[layer][block]
            assert self.kv.allocator._is_free[page] == 0, "write into a free page"
            self.store[(page, slot)] = (token, pos, layer, digest)

    def _read(self, chunk, length):
        g = self.kv.geometry(chunk.request.model)
        context = []
        for pos in range(length):
            block, slot = divmod(pos, g.tokens_per_page)
            seen = set()
            for layer in range(g.num_layers):
                token, p, l, digest = self.store[(chunk.page_table[layer][block], slot)]
                assert (p, l) == (pos, layer)
                assert digest == hash(tuple(context) + (token,)), "K/V computed in another context"
                seen.add(token)
            assert len(seen) == 1
            context.append(seen.pop())
        return context

    def _stops(self, r, out):
        g = self.kv.geometry(r.model)
        return ((self.stop_at_eos and out[-1] == EOS) or len(out) >= r.max_tokens
                or r.num_prompt_tokens + len(out) >= g.max_model_len)

    def step(self):
        out = self.sched.schedule()
        self.outputs.append(out)
        for rid, _ in out.rejected:
            self.finished[rid] = None
        sampled, stopped = {}, []
        for chunk in out.chunks:
            r = chunk.request
            g = self.kv.geometry(r.model)
            assert chunk.token_ids == r.all_token_ids[chunk.start:chunk.start + chunk.num_tokens]
            need = chunk.start + chunk.num_tokens + chunk.num_steps - 1
            assert len(chunk.page_table) == g.num_layers
            assert len(chunk.page_table[0]) * g.tokens_per_page >= need
            context = r.all_token_ids
            for j, token in enumerate(chunk.token_ids):
                self._write(chunk, chunk.start + j, token, context)
            if not chunk.samples:
                continue
            length = chunk.start + chunk.num_tokens
            new = []
            for j in range(chunk.num_steps):
                token = next_token(r.model, self._read(chunk, length))
                new.append(token)
                if self._stops(r, r.output_token_ids + new):
                    stopped.append(r)
                    break
                if j + 1 < chunk.num_steps:       # a multi-step decode feeds it on device
                    self._write(chunk, length, token, r.all_token_ids + new)
                    length += 1
            sampled[r.request_id] = new
        self.sched.update_from_output(out, sampled)
        for r in stopped:
            status = (RequestStatus.FINISHED_STOPPED if self.stop_at_eos and r.output_token_ids[-1] == EOS
                      else RequestStatus.FINISHED_LENGTH)
            self.sched.finish_request(r.request_id, status)
            self.finished[r.request_id] = r
        return out

    def run(self, max_steps=500):
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("requests did not finish")


def make_scheduler(pages_per_device=64, num_devices=1, caching=True, max_pages=None, fit_together=None, **config):
    kv = KVCacheManager(PageAllocator(pages_per_device, num_devices), enable_prefix_caching=caching)
    for g in GEOMETRIES.values():
        kv.register_model(g, max_pages=(max_pages or {}).get(g.name))
    return Scheduler(SchedulerConfig(enable_prefix_caching=caching, **config), kv, fit_together=fit_together)


def make_request(rid, model, prompt_len, rng, max_tokens=8, arrival=None, prompt=None):
    prompt = prompt if prompt is not None else [rng.randrange(1, 50) for _ in range(prompt_len)]
    kwargs = {} if arrival is None else {"arrival_time": arrival}
    return Request(rid, model, prompt, SamplingParams(max_tokens=max_tokens), **kwargs)


def check_outputs(engine, requests, stop_at_eos=True):
    for r in requests:
        g = GEOMETRIES[r.model]
        assert r.is_finished, r.request_id
        assert r.output_token_ids == reference_output(r.model, r.prompt_token_ids, r.max_tokens, g.max_model_len,
                                                      stop_at_eos), r.request_id


def assert_pool_empty(sched):
    kv = sched.kv
    assert kv.pages_used_by_model() == {"a": 0, "b": 0}
    assert kv.num_free_pages() == kv.allocator.num_total
    kv.reset_prefix_cache()
    assert kv.allocator.num_free() == kv.allocator.num_total
