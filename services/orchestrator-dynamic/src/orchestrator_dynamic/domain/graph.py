"""Dependency-graph algorithms shared by validation and scheduling.

Everything is iterative: plans may hold thousands of tasks and a dependency chain as long
as the configured depth limit, which would overflow Python's recursion limit.
Edges point from a task to the tasks it depends on (``a -> b`` means "a waits for b").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence


def strongly_connected_components(
    nodes: Sequence[str], edges: Mapping[str, Sequence[str]]
) -> list[list[str]]:
    """Tarjan's algorithm; every edge target must be in ``nodes``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work: list[tuple[str, Iterator[str]]] = [(root, iter(edges.get(root, ())))]
        while work:
            node, successors = work[-1]
            descended = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(edges.get(succ, ()))))
                    descended = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if descended:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(component)
    return components


def cycle_through(start: str, members: set[str], edges: Mapping[str, Sequence[str]]) -> list[str]:
    """The shortest cycle from ``start`` back to itself inside one strongly connected
    component, as ``[start, ..., start]``."""
    parents: dict[str, str] = {}
    queue: deque[str] = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for succ in edges.get(node, ()):
            if succ not in members:
                continue
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                path.reverse()
                path.append(start)
                return path
            if succ not in seen:
                seen.add(succ)
                parents[succ] = node
                queue.append(succ)
    raise ValueError(f"{start!r} is not on a cycle")


def find_cycles(nodes: Sequence[str], edges: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """One cycle per cyclic strongly connected component (self-loops excluded), each
    starting at the component's first node in ``nodes`` order; components in that order."""
    order = {node: i for i, node in enumerate(nodes)}
    cycles: list[list[str]] = []
    for component in strongly_connected_components(nodes, edges):
        if len(component) < 2:
            continue
        members = set(component)
        start = min(component, key=order.__getitem__)
        cycles.append(cycle_through(start, members, edges))
    cycles.sort(key=lambda cycle: order[cycle[0]])
    return cycles


def longest_chains(
    nodes: Sequence[str], edges: Mapping[str, Sequence[str]]
) -> tuple[dict[str, int], dict[str, str]]:
    """For an acyclic graph: ``depth[n]`` = tasks on the longest chain from ``n`` down to a
    task without dependencies (1 for such a task), and ``next_hop[n]`` = the dependency that
    chain continues through. Raises ``ValueError`` on a cycle."""
    remaining = {node: len(edges.get(node, ())) for node in nodes}
    dependents: dict[str, list[str]] = {node: [] for node in nodes}
    for node in nodes:
        for dep in edges.get(node, ()):
            dependents[dep].append(node)
    depth: dict[str, int] = {}
    next_hop: dict[str, str] = {}
    queue: deque[str] = deque(node for node in nodes if remaining[node] == 0)
    for node in queue:
        depth[node] = 1
    while queue:
        node = queue.popleft()
        for dependent in dependents[node]:
            if depth[node] + 1 > depth.get(dependent, 0):
                depth[dependent] = depth[node] + 1
                next_hop[dependent] = node
            remaining[dependent] -= 1
            if remaining[dependent] == 0:
                queue.append(dependent)
    if len(depth) != len(nodes) or any(remaining.values()):
        raise ValueError("graph has a cycle")
    return depth, next_hop


def reverse_edges(nodes: Sequence[str], edges: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The edges turned around (``b -> a`` for every ``a -> b``), every node a key, each
    edge once however often it is listed."""
    reversed_edges: dict[str, list[str]] = {node: [] for node in nodes}
    for node in nodes:
        for target in dict.fromkeys(edges.get(node, ())):
            reversed_edges[target].append(node)
    return reversed_edges


def heights(nodes: Sequence[str], edges: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """For an acyclic graph: tasks on the longest chain of dependents above ``n``, counting
    ``n`` (1 for a task nothing depends on). Used to run the critical path first."""
    depth, _ = longest_chains(nodes, reverse_edges(nodes, edges))
    return depth


def reachable(roots: Sequence[str], edges: Mapping[str, Sequence[str]]) -> set[str]:
    """Every node reachable from one of ``roots`` along ``edges``, roots excluded (with the
    reversed dependency edges: every task that directly or not depends on a root)."""
    found: set[str] = set()
    queue: deque[str] = deque(roots)
    while queue:
        node = queue.popleft()
        for target in edges.get(node, ()):
            if target not in found:
                found.add(target)
                queue.append(target)
    return found - set(roots)
