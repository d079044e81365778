"""Helpers for nested dicts of arrays, the form of every parameter tree."""


def flatten(tree, prefix=""):
    """Return ``{dotted path: leaf}`` for a nested dict, in insertion order."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def unflatten(flat):
    """Rebuild a nested dict from ``{dotted path: leaf}``."""
    tree = {}
    for path, leaf in flat.items():
        *parents, name = path.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = leaf
    return tree


def tree_map(function, *trees):
    """Apply ``function`` leaf by leaf to trees of the same structure."""
    first = trees[0]
    if isinstance(first, dict):
        return {key: tree_map(function, *(tree[key] for tree in trees)) for key in first}
    return function(*trees)


def count_parameters(tree):
    """Return the number of scalars in a tree of arrays."""
    return sum(int(leaf.size) for leaf in flatten(tree).values())
