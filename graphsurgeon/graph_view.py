"""A networkx view of a graph, built on demand for analyses and never maintained by hand.

Nodes of the DiGraph are ``ir.Node`` objects plus one synthetic ``SOURCE`` that feeds every
node reading a graph input or an initializer (and every node with no inputs), so that
dominators have a single root. A node with subgraphs (If, Loop, Scan) gets edges from the
producers of every outer value its subgraphs read, since it depends on them.
"""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx
import onnx_ir as ir

from graphsurgeon.layers import find_layers

SOURCE = "<source>"


def _outer_values(node: ir.Node) -> Iterable[ir.Value]:
    """Values from enclosing scopes that the subgraphs of ``node`` read."""
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.as_graph()]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.as_graphs())
        else:
            continue
        for graph in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(graph):
                for value in inner.inputs:
                    if value is None:
                        continue
                    producer = value.producer()
                    owner = producer.graph if producer is not None else value.graph
                    if owner is not None and owner is node.graph:
                        yield value


class GraphView:
    """Producers, consumers, reachability, dominators and layer distances of one graph."""

    def __init__(self, model_or_graph: ir.Model | ir.Graph) -> None:
        if isinstance(model_or_graph, ir.Model):
            self.graph = model_or_graph.graph
            self.layer_nodes = {layer.node: layer.id for layer in find_layers(model_or_graph)}
        else:
            self.graph = model_or_graph
            self.layer_nodes = {}
        g = nx.DiGraph()
        g.add_node(SOURCE)
        for node in self.graph:
            g.add_node(node)
            values = [v for v in node.inputs if v is not None]
            values.extend(_outer_values(node))
            if not values:
                g.add_edge(SOURCE, node)
            for value in values:
                producer = value.producer()
                if producer is None or producer.graph is not self.graph:
                    g.add_edge(SOURCE, node)
                else:
                    g.add_edge(producer, node)
        self.nx = g

    def producers(self, node: ir.Node) -> list[ir.Node]:
        return [p for p in self.nx.predecessors(node) if p is not SOURCE]

    def consumers(self, node: ir.Node) -> list[ir.Node]:
        return list(self.nx.successors(node))

    def reachable(self, src: ir.Node, dst: ir.Node) -> bool:
        return nx.has_path(self.nx, src, dst)

    def descendants(self, node: ir.Node) -> set[ir.Node]:
        return nx.descendants(self.nx, node)

    def immediate_dominators(self) -> dict[ir.Node, ir.Node]:
        """Node -> its immediate dominator (``SOURCE`` for nodes fed by graph inputs)."""
        idom = nx.immediate_dominators(self.nx, SOURCE)
        return {n: d for n, d in idom.items() if n is not SOURCE}

    def dominates(self, a: ir.Node, b: ir.Node) -> bool:
        """Whether every path from the graph inputs to ``b`` passes through ``a``."""
        idom = nx.immediate_dominators(self.nx, SOURCE)
        while b is not SOURCE:
            if b is a:
                return True
            b = idom[b]
        return False

    def layer_distance(self, src: ir.Node, dst: ir.Node) -> int | None:
        """Fewest layers entered on a path from ``src`` to ``dst`` (``dst`` counts if a layer).

        Two Convs with only a ReLU between them are 1 apart. None if ``dst`` is unreachable.
        """

        def weight(_u: object, v: object, _d: dict) -> int:
            return 1 if v in self.layer_nodes else 0

        try:
            return int(nx.shortest_path_length(self.nx, src, dst, weight=weight))
        except nx.NetworkXNoPath:
            return None

    def layer_graph(self) -> nx.DiGraph:
        """Layer ids, with an edge a->b where b is reachable from a without crossing a layer."""
        lg = nx.DiGraph()
        lg.add_nodes_from(self.layer_nodes.values())
        for node, lid in self.layer_nodes.items():
            stack, seen = list(self.nx.successors(node)), set()
            while stack:
                nxt = stack.pop()
                if nxt in seen:
                    continue
                seen.add(nxt)
                if nxt in self.layer_nodes:
                    lg.add_edge(lid, self.layer_nodes[nxt])
                else:
                    stack.extend(self.nx.successors(nxt))
        return lg
