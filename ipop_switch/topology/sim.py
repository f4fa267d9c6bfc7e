"""The simulator: N virtual nodes running the real policy, link-state and flood plan.

No OVS, no sockets. Time advances in rounds of ``params.cycle`` seconds; in a round every
node runs ``TopologyPolicy.decide`` once on its current view, its requests are accepted or
refused by the target's own policy at once, releases are answered at once, and at the
end of the round requested links come up and every node whose up links changed sends its
new LSA to every member (counted as N-1 messages of its JSON size). A newcomer gets every
member's current LSA. The graph is then measured with ``ryu_apps.flood``: the trees of a
sample of origins are built with flood's own ``bfs``/``tree_parent`` (shared across
nodes), checked equal to the real ``compute_plan`` of a few nodes (which is also timed:
it is O(N*(N+E)) and cannot run for every node at 1000), and broadcasts go hop by hop
through ``originate``/``forward`` on each node's plan.

Above ``FULL_DB_LIMIT`` nodes only a sample of nodes (the observers) keeps a real
LinkStateDB; message counts are always for every node.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ryu_apps import flood

from .linkstate import LinkStateDB, LsaOriginator
from .policy import ON_DEMAND, TopologyParams, TopologyPolicy
from .ring import Ring

FULL_DB_LIMIT = 2000       # up to this many nodes every node keeps a LinkStateDB
EXACT_DIAMETER_LIMIT = 2000  # up to this many nodes the diameter is exact (a BFS from every node)
SETTLE_SECONDS = 120.0     # quiet time between phases: a churn event hits a settled overlay,
                           # not one whose rate limits are still spent on its cold start
REDECIDE_ON_REFUSAL = 3    # a node refused a link decides again at once, this many times per round

Edge = tuple[str, str]


def _key(a: str, b: str) -> Edge:
    return (a, b) if a < b else (b, a)


@dataclass
class SimConfig:
    nodes: int = 1000
    churn_pct: float = 10.0
    seed: int = 1
    params: TopologyParams = field(default_factory=TopologyParams)
    pairs: int = 2000            # sampled node pairs for unicast hops
    broadcast_roots: int = 20    # origins whose broadcasts are simulated hop by hop
    plan_samples: int = 3        # nodes whose full compute_plan is timed and compared
    observers: int | None = None  # nodes keeping a LinkStateDB (None: all up to FULL_DB_LIMIT, else 200)
    max_rounds: int = 60         # per phase; not converged by then is reported as such
    ondemand_pairs: int = 4      # pairs 2+ hops apart given traffic above the threshold


@dataclass
class Counters:
    """What a phase cost: rounds, links and LSA messages."""

    rounds: int = 0
    converged: bool = False
    opened: int = 0          # link requests that made new links (accepted)
    created: int = 0         # links that came up
    torn: int = 0            # links closed by the policy
    lost: int = 0            # links that went with a leaving node
    refused: int = 0
    lsa_messages: int = 0
    lsa_bytes: int = 0
    seconds: float = 0.0


class _Node:
    __slots__ = ("id", "policy", "db", "orig")

    def __init__(self, node_id: str, params: TopologyParams, epoch_ms: int, observer: bool):
        self.id = node_id
        self.policy = TopologyPolicy(node_id, params)
        self.db = LinkStateDB() if observer else None
        self.orig = LsaOriginator(node_id, epoch_ms)


class Simulation:
    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self.params = cfg.params
        self.rng = random.Random(cfg.seed)
        self.nodes: dict[str, _Node] = {}
        self.adj: dict[str, set[str]] = {}
        self.pending: set[Edge] = set()
        self.now = 0.0
        self.observer_budget = (cfg.observers if cfg.observers is not None
                                else (cfg.nodes if cfg.nodes <= FULL_DB_LIMIT else 200))

    # -- membership ------------------------------------------------------------------
    def new_id(self) -> str:
        while True:
            i = f"{self.rng.getrandbits(128):032x}"
            if i not in self.nodes:
                return i

    def _observers(self) -> int:
        return sum(1 for n in self.nodes.values() if n.db is not None)

    def join(self, count: int, c: Counters) -> list[str]:
        """``count`` new nodes appear at once; every member sends them its own LSA."""
        ids = [self.new_id() for _ in range(count)]
        existing = [n for n in self.nodes.values() if n.orig.current is not None]
        sizes = [len(n.orig.current.encode()) for n in existing]
        for i in ids:
            obs = self._observers() < self.observer_budget
            node = self.nodes[i] = _Node(i, self.params, int(self.now * 1000), obs)
            self.adj[i] = set()
            c.lsa_messages += len(existing)
            c.lsa_bytes += sum(sizes)
            if node.db is not None:
                for n in existing:
                    node.db.update(n.orig.current)
        return ids

    def leave(self, ids: list[str], c: Counters) -> None:
        """Nodes vanish: their links go down at the other ends, their LSAs are dropped."""
        gone = set(ids)
        for i in ids:
            for q in self.adj.pop(i):
                if q in gone:
                    c.lost += 1 if i < q else 0
                    continue
                self.adj[q].discard(i)
                self.nodes[q].policy.link_down(i, self.now)
                c.lost += 1
            del self.nodes[i]
        self.pending = {e for e in self.pending if e[0] not in gone and e[1] not in gone}
        for n in self.nodes.values():
            if n.db is not None:
                for i in ids:
                    n.db.remove(i)
            for i in ids:
                n.policy.link_down(i, self.now)

    # -- one round -------------------------------------------------------------------
    def _close(self, a: str, b: str, c: Counters) -> None:
        e = _key(a, b)
        if b in self.adj.get(a, ()):
            self.adj[a].discard(b)
            self.adj[b].discard(a)
            c.torn += 1
        self.pending.discard(e)
        for x, y in ((a, b), (b, a)):
            if x in self.nodes:
                self.nodes[x].policy.link_down(y, self.now)

    def _apply(self, a: str, d, c: Counters) -> int:
        """Carry out one decision of node a; returns how many of its requests were refused."""
        pol = self.nodes[a].policy
        refused = 0
        for q in d.close:
            self._close(a, q, c)
        for q in d.release:
            if q in self.nodes and self.nodes[q].policy.released(a, self.now):
                self._close(a, q, c)
        for q, role in d.open:
            if q not in self.nodes:
                continue
            e = _key(a, q)
            ok = self.nodes[q].policy.accept_incoming(a, role, self.now)
            if e in self.pending or q in self.adj[a]:
                continue
            if ok:
                self.pending.add(e)
                c.opened += 1
            else:
                pol.refused(q, self.now)
                c.refused += 1
                refused += 1
        return refused

    def round(self, c: Counters) -> bool:
        """Every node decides once; links come up and LSAs go out at the end. True: quiet
        (no action, nothing held or pending)."""
        self.now += self.params.cycle
        ring = Ring(self.nodes)
        order = list(self.nodes)
        self.rng.shuffle(order)
        quiet = True
        degrees = {i: len(n.orig.current.neighbours) for i, n in self.nodes.items() if n.orig.current is not None}
        for a in order:
            pol = self.nodes[a].policy
            for _ in range(1 + REDECIDE_ON_REFUSAL):  # a refused request is re-drawn at once
                d = pol.decide(self.now, ring, degrees)
                quiet = quiet and d.settled
                if not self._apply(a, d, c):
                    break
        for a, b in self.pending:
            self.adj[a].add(b)
            self.adj[b].add(a)
            self.nodes[a].policy.link_up(b, self.now)
            self.nodes[b].policy.link_up(a, self.now)
            c.created += 1
        self.pending.clear()
        self._flood_lsas(c)
        c.rounds += 1
        return quiet

    def _flood_lsas(self, c: Counters) -> None:
        changed = [lsa for n in self.nodes.values() if (lsa := n.orig.update(self.adj[n.id])) is not None]
        others = len(self.nodes) - 1
        for lsa in changed:
            c.lsa_messages += others
            c.lsa_bytes += others * len(lsa.encode())
        for n in self.nodes.values():
            if n.db is not None:
                for lsa in changed:
                    if lsa.origin != n.id:
                        n.db.update(lsa)

    def consistent(self, edge_checks: int = 3) -> bool:
        """Every observer's database holds exactly the members' latest LSAs, and the graph
        it yields equals the real one (checked in full for a few observers)."""
        latest = {i: n.orig.current.version for i, n in self.nodes.items() if n.orig.current is not None}
        obs = [n for n in self.nodes.values() if n.db is not None]
        for n in obs:
            mine = latest.pop(n.id, None)
            ok = n.db.versions() == latest
            if mine is not None:
                latest[n.id] = mine
            if not ok:
                return False
        real = self.edges()
        for n in obs[:edge_checks]:
            if n.db.edges(n.id, self.adj[n.id]) != real:
                return False
        return True

    def run_until_stable(self, c: Counters, progress: Callable[[str], None] | None = None) -> Counters:
        t0 = time.perf_counter()
        for _ in range(self.cfg.max_rounds):
            quiet = self.round(c)
            if progress:
                progress(f"round {c.rounds}: {sum(len(v) for v in self.adj.values()) // 2} links")
            if quiet and self.consistent():
                c.converged = True
                c.rounds -= 1  # the quiet round only confirms: converged at the end of the one before
                break
        c.seconds = time.perf_counter() - t0
        return c

    def edges(self) -> set[Edge]:
        return {_key(a, b) for a, bs in self.adj.items() for b in bs if a < b}


# -- measurements --------------------------------------------------------------------
def _pct(values: list[int], q: float) -> float:
    s = sorted(values)
    if not s:
        return 0.0
    return float(s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))])


def measure_graph(adj: dict[str, set[str]], rng: random.Random, pairs: int) -> dict:
    nodes = sorted(adj)
    n = len(nodes)
    degrees = [len(adj[x]) for x in nodes]
    reach = flood.bfs(adj, nodes[0]) if nodes else {}
    out: dict = {"nodes": n, "links": sum(degrees) // 2, "connected": len(reach) == n,
                 "degree_mean": round(statistics.fmean(degrees), 2) if degrees else 0,
                 "degree_max": max(degrees, default=0), "degree_min": min(degrees, default=0)}
    # unicast hops over sampled pairs (BFS from a sample of sources)
    sources = rng.sample(nodes, min(n, max(1, pairs // 20)))
    per = max(1, pairs // len(sources)) if sources else 0
    hops: list[int] = []
    ecc = 0
    for s in sources:
        d = flood.bfs(adj, s)
        ecc = max(ecc, max(d.values()))
        targets = [t for t in rng.choices(nodes, k=per) if t != s and t in d]
        hops += [d[t] for t in targets]
    out.update(hops_pairs=len(hops), hops_mean=round(statistics.fmean(hops), 2) if hops else 0,
               hops_p50=_pct(hops, 50), hops_p99=_pct(hops, 99), hops_max=max(hops, default=0))
    if n <= EXACT_DIAMETER_LIMIT:
        out["diameter"] = max(max(flood.bfs(adj, s).values()) for s in nodes) if n else 0
        out["diameter_exact"] = True
    else:  # lower bound: the sampled eccentricities and a few double sweeps
        x = sources[0]
        for _ in range(4):
            d = flood.bfs(adj, x)
            far = max(d, key=d.__getitem__)
            ecc = max(ecc, d[far])
            x = far
        out["diameter"] = ecc
        out["diameter_exact"] = False
    return out


def build_plans(adj: dict[str, set[str]], roots: list[str]) -> dict[str, flood.FloodPlan]:
    """Every node's plan for ``roots`` with flood's own rules (bfs, tree_parent), each BFS
    shared by all nodes (they all hold the same converged view)."""
    nodes = sorted(adj)
    index_of = {x: i + 1 for i, x in enumerate(nodes)}
    plans = {x: flood.FloodPlan(me=x, index_of=index_of) for x in nodes}
    for r in roots:
        d = flood.bfs(adj, r)
        parent = {x: (flood.tree_parent(adj, d, x) if x != r else None) for x in d}
        children: dict[str, list[str]] = {}
        for x, p in parent.items():
            if p is not None:
                children.setdefault(p, []).append(x)
        for x in d:
            plans[x].roots[r] = flood.RootPlan(root=r, index=index_of[r], dist=d[x], parent=parent[x],
                                               children=tuple(sorted(children.get(x, ()))))
    return plans


def simulate_broadcasts(plans: dict[str, flood.FloodPlan], roots: list[str]) -> dict:
    """Each root floods once through ``originate``/``forward`` on every node's own plan."""
    receptions_min, receptions_max, frames = 1 << 30, 0, 0
    bad_roots = 0
    for r in roots:
        got = dict.fromkeys(plans, 0)
        nbrs, idx, depth = flood.originate(plans[r])
        queue = [(x, r, depth) for x in nbrs]
        frames += len(queue)
        while queue:
            nxt = []
            for x, frm, dep in queue:
                accept, fwd, d2 = flood.forward(plans[x], idx, dep, frm)
                if accept:
                    got[x] += 1
                    nxt += [(y, x, d2) for y in fwd]
            frames += len(nxt)
            queue = nxt
        del got[r]
        lo, hi = min(got.values(), default=1), max(got.values(), default=1)
        receptions_min, receptions_max = min(receptions_min, lo), max(receptions_max, hi)
        bad_roots += (lo, hi) != (1, 1)
    receivers = (len(plans) - 1) * len(roots)
    return {"roots": len(roots), "frames_per_node": round(frames / receivers, 4) if receivers else 0,
            "receptions_min": receptions_min, "receptions_max": receptions_max,
            "exactly_once": bad_roots == 0}


def time_compute_plan(adj: dict[str, set[str]], samples: list[str], plans: dict[str, flood.FloodPlan],
                      roots: list[str]) -> dict:
    """The real compute_plan for a few nodes: its time, and its trees equal to the sim's."""
    if len(adj) > flood.MAX_ROOTS:
        return {"samples": 0, "note": f"{len(adj)} nodes > {flood.MAX_ROOTS} roots a 12-bit VID can tag: "
                                      "the switch app cannot serve this overlay; trees checked with flood's rules only"}
    times, equal = [], True
    for me in samples:
        view = flood.normalize(me, [(a, b) for a in adj for b in adj[a] if a < b], adj)
        t0 = time.perf_counter()
        real = flood.compute_plan(me, view)
        times.append(time.perf_counter() - t0)
        equal &= all(real.roots.get(r) == plans[me].roots.get(r) for r in roots)
    return {"samples": len(samples), "ms_mean": round(1000 * statistics.fmean(times), 1),
            "ms_max": round(1000 * max(times), 1), "equal_to_sim_trees": equal}


def ondemand_phase(sim: Simulation, pairs: int, traffic_rounds: int = 6) -> dict:
    """Pairs 2+ hops apart exchange traffic at twice the threshold for ``traffic_rounds``
    rounds: when does each pair's on-demand link come up (a target at its degree cap
    refuses it)? Then silence: rounds until the links are gone (the idle timeout)."""
    p = sim.params
    if p.ondemand_threshold_bps <= 0 or pairs <= 0 or len(sim.nodes) < 3:
        return {"pairs": 0}
    nodes = sorted(sim.nodes)
    chosen: list[Edge] = []
    for _ in range(50 * pairs):
        a, b = sim.rng.sample(nodes, 2)
        if b not in sim.adj[a] and _key(a, b) not in chosen and flood.bfs(sim.adj, a).get(b, 0) >= 2:
            chosen.append(_key(a, b))
        if len(chosen) == pairs:
            break
    per_round = int(2 * p.ondemand_threshold_bps / 8 * p.cycle)
    c = Counters()
    up_round: dict[Edge, int] = {}
    roles_ok = True
    for r in range(1, traffic_rounds + 1):
        for a, b in chosen:  # traffic spread over the round
            for k in range(4):
                t = sim.now + (k + 1) * p.cycle / 4
                sim.nodes[a].policy.traffic(b, per_round // 4, t)
                sim.nodes[b].policy.traffic(a, per_round // 4, t)
        sim.round(c)
        for a, b in chosen:
            if b in sim.adj[a] and (a, b) not in up_round:
                up_round[(a, b)] = r
                roles_ok &= ON_DEMAND in (sim.nodes[a].policy.roles().get(b), sim.nodes[b].policy.roles().get(a))
    still_up = {e for e in chosen if e[1] in sim.adj[e[0]]}
    down_after = None
    for r in range(1, sim.cfg.max_rounds + 1):
        if not any(b in sim.adj[a] for a, b in chosen):
            down_after = r - 1
            break
        sim.round(c)
    settle = sim.run_until_stable(Counters())
    return {"pairs": len(chosen), "up": len(up_round), "up_in_rounds": sorted(up_round.values()),
            "refused": c.refused, "role_on_demand": roles_ok and bool(up_round),
            "up_at_end_of_traffic": len(still_up),
            "rounds_until_removed": down_after,
            "seconds_until_removed": down_after * p.cycle if down_after is not None else None,
            "created": c.created, "torn": c.torn, "settled": settle.converged}


def _per_event(c: Counters, events: int, n: int) -> dict:
    d = asdict(c)
    d["seconds"] = round(c.seconds, 2)
    if events:
        d.update(events=events,
                 links_created_per_event=round(c.created / events, 2),
                 links_torn_per_event=round((c.torn + c.lost) / events, 2),
                 lsa_messages_per_event=round(c.lsa_messages / events, 1),
                 lsa_messages_per_node_per_event=round(c.lsa_messages / events / n, 2),
                 lsa_bytes_per_node_per_event=round(c.lsa_bytes / events / n, 1))
    return d


def run(cfg: SimConfig, progress: Callable[[str], None] | None = None) -> dict:
    """The whole run: bootstrap, figures, 10 % churn, one join, one leave, on-demand."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    say = progress or (lambda s: None)
    sim = Simulation(cfg)
    n = cfg.nodes
    boot = Counters()
    sim.join(n, boot)
    say(f"bootstrap: {n} nodes")
    sim.run_until_stable(boot, progress)
    report: dict = {"config": {k: v for k, v in asdict(cfg).items() if k != "params"},
                    "params": asdict(cfg.params), "bootstrap": _per_event(boot, 0, n)}
    report["params"]["long_links_total"] = cfg.params.long_total(n)
    report["params"]["long_links_opened"] = cfg.params.long_opened(n)
    say("measuring the graph")
    t0 = time.perf_counter()
    report["graph"] = measure_graph(sim.adj, sim.rng, cfg.pairs)
    report["graph"]["seconds"] = round(time.perf_counter() - t0, 2)
    say("broadcasts and flood plans")
    t0 = time.perf_counter()
    nodes = sorted(sim.adj)
    roots = sim.rng.sample(nodes, min(len(nodes), cfg.broadcast_roots))
    plans = build_plans(sim.adj, roots)
    report["broadcast"] = simulate_broadcasts(plans, roots)
    report["broadcast"]["seconds"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    report["plan"] = time_compute_plan(sim.adj, sim.rng.sample(nodes, min(len(nodes), cfg.plan_samples)), plans, roots)
    report["plan"]["seconds"] = round(time.perf_counter() - t0, 2)
    del plans

    churn = max(1, round(n * cfg.churn_pct / 100)) if cfg.churn_pct > 0 else 0
    if churn:
        say(f"churn: {churn} leave, {churn} join")
        sim.now += SETTLE_SECONDS
        c = Counters()
        sim.leave(sim.rng.sample(sorted(sim.nodes), churn), c)
        sim.join(churn, c)
        sim.run_until_stable(c, progress)
        report["churn"] = _per_event(c, 2 * churn, n)
        report["churn"]["leaves"] = report["churn"]["joins"] = churn
        report["graph_after_churn"] = measure_graph(sim.adj, sim.rng, min(cfg.pairs, 500))
    for name, act in (("one_join", lambda c: sim.join(1, c)),
                      ("one_leave", lambda c: sim.leave(sim.rng.sample(sorted(sim.nodes), 1), c))):
        sim.now += SETTLE_SECONDS
        c = Counters()
        act(c)
        sim.run_until_stable(c)
        report[name] = _per_event(c, 1, len(sim.nodes))
    say("on-demand links")
    report["ondemand"] = ondemand_phase(sim, cfg.ondemand_pairs)

    g, log2n = report["graph"], math.log2(n) if n > 1 else 1.0
    report["budget"] = {
        "log2_n": round(log2n, 2),
        "degree_mean_le_log2n_plus_4": g["degree_mean"] <= log2n + 4,
        "degree_max_le_max_degree": g["degree_max"] <= cfg.params.max_degree,
        "hops_p99_le_log2n": g["hops_p99"] <= log2n,
        "broadcast_exactly_once": report["broadcast"]["exactly_once"],
        "churn_converged": (not churn) or report["churn"]["converged"],
    }
    report["seconds_total"] = round(time.perf_counter() - t_start, 1)
    report["cpu_seconds_total"] = round(time.process_time() - cpu_start, 1)
    return report
