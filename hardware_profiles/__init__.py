"""Shipped hardware profiles (YAML), installed as ``graphsurgeon.hardware_profiles``.

See ``graphsurgeon.profiles`` for the schema; ``graphsurgeon profile detect`` writes new ones.
"""
