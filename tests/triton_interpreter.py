"""Speed-ups of Triton's CPU interpreter (TRITON_INTERPRET=1) for the test run: each skips
work whose result nobody reads or shares what does not change, so the interpreted kernels
compute exactly what they computed before. Each checks that Triton's internals look as
expected and leaves them alone otherwise. tests/conftest.py applies them before any test
imports a kernel."""
from __future__ import annotations

import math


def speed_up() -> None:
    _patch_language_once_per_launch()
    _skip_discarded_overflow_checks()
    _cache_interpreter_type_lookups()
    _share_block_types()
    _share_tensor_shapes()


def _patch_language_once_per_launch() -> None:
    """Triton's interpreter swaps triton.language's builtins for interpreted ones when a kernel
    launches (undone when it returns), and again, without undoing, on every call of a
    @triton.jit helper inside the kernel: an `inspect.getmembers` of each language module per
    call, a fifth of an interpreted engine step. A helper call inside a launch that already
    swapped the same language modules skips it; the interpreted operations are the same."""
    try:
        from triton.runtime import interpreter
        import triton.language as tl
    except ImportError:
        return
    original, grid_call = getattr(interpreter, "_patch_lang", None), interpreter.GridExecutor.__call__
    if original is None or getattr(original, "_deepserve_once", False):
        return
    launches: list[set] = []   # per running launch: the language modules it swapped

    def langs(fn) -> set:
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    def patch_lang(fn):
        if launches and langs(fn) <= launches[-1]:
            return interpreter._LangPatchScope()
        if launches:
            launches[-1] |= langs(fn)
        return original(fn)

    def call(self, *args, **kwargs):
        launches.append(set())    # filled by the launch's own swap, which comes first
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launches.pop()

    patch_lang._deepserve_once = True
    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = call


def _skip_discarded_overflow_checks() -> None:
    """Every integer add/sub/mul the interpreter runs also redoes the operation in int64, compares
    it with the type's range and hands the result to `device_assert`, which drops it unless the
    builder's options ask for debug (the interpreter's never do): a third of an interpreted
    engine step spent on checks nobody reads. Off when they would be discarded; the kernels'
    results are the same."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is None or getattr(options, "debug", True) or not getattr(options, "sanitize_overflow", False):
        return
    import dataclasses
    builder.options = dataclasses.replace(options, sanitize_overflow=False)


def _cache_interpreter_type_lookups() -> None:
    """Two of the interpreter's per-operation costs that depend on the types alone: the numpy
    dtype of a Triton type (`_get_np_dtype` builds its table of 17 numpy dtypes on every call)
    and the display name of a tuple type (formatted whenever a tensor's shape tuple is made,
    read only when printed). The table is built once; the name when first read."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.language import core
        from triton.runtime import interpreter
    except ImportError:
        return
    lookup = getattr(interpreter, "_get_np_dtype", None)
    if lookup is not None and not getattr(lookup, "_deepserve_cached", False):
        names = ("int1", "float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                 "int64", "uint64", "bfloat16", "float8e5", "float8e5b16", "float8e4nv", "float8e4b8", "float8e4b15")
        if all(hasattr(tl, n) for n in names):
            table = {getattr(tl, n): lookup(getattr(tl, n)) for n in names}
            pointer = np.dtype(np.uint64)

            def np_dtype(tt_dtype):
                scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
                if isinstance(scalar, tl.pointer_type):
                    return pointer
                found = table.get(scalar)
                return found if found is not None else lookup(tt_dtype)   # a type not in the table

            np_dtype._deepserve_cached = True
            interpreter._get_np_dtype = np_dtype
    tuple_type = getattr(core, "tuple_type", None)
    init = getattr(tuple_type, "__init__", None)
    if init is None or getattr(init, "_deepserve_lazy", False) or "name" in vars(tuple_type):
        return
    probe = tuple_type([tl.int32], ["x"])
    if vars(probe) != {"types": [tl.int32], "fields": ["x"], "name": "[x:int32]"}:
        return   # another Triton's tuple_type: left as it is

    def lazy_init(self, types, fields=None):
        self.types = types
        self.fields = fields or [''] * len(types)

    def name(self):
        return '[' + ','.join([f"{k}:{v}" for k, v in zip(self.fields, self.types)]) + ']'

    lazy_init._deepserve_lazy = True
    tuple_type.__init__ = lazy_init
    tuple_type.name = property(name)


def _share_block_types() -> None:
    """Every interpreted operation makes the block type of its result (a shape tuple, its
    checks and its name, a fifth of an interpreted step): a block type of an element type
    and shape already made takes that one's fields (nothing changes a block type once made)."""
    try:
        from triton.language import core
    except ImportError:
        return
    block_type = getattr(core, "block_type", None)
    init = getattr(block_type, "__init__", None)
    if init is None or getattr(init, "_deepserve_shared", False):
        return
    if set(vars(block_type(core.float32, [2, 4]))) != {"element_ty", "shape", "numel", "name"}:
        return   # another Triton's block_type: left as it is
    made: dict = {}

    def type_key(ty):   # pointer types compare by these fields and do not hash
        if isinstance(ty, core.pointer_type):
            return "pointer", type_key(ty.element_ty), ty.address_space, ty.const
        return ty

    def shared_init(self, element_ty, shape):
        if isinstance(shape, (list, core.tuple)):
            dims = shape.values if isinstance(shape, core.tuple) else shape
            key = (type_key(element_ty), tuple(d.value if isinstance(d, core.constexpr) else d for d in dims))
            first = made.get(key)
            if first is not None:
                self.__dict__.update(first.__dict__)
                return
        init(self, element_ty, shape)
        if isinstance(shape, (list, core.tuple)):
            made[key] = self

    shared_init._deepserve_shared = True
    block_type.__init__ = shared_init


def _share_tensor_shapes() -> None:
    """Likewise each interpreted value's shape (a tuple of constexprs) and element count: made
    once per shape, shared by the values of that shape (neither is changed once made)."""
    try:
        from triton.language import core
    except ImportError:
        return
    tensor = core.tensor
    init = tensor.__init__
    if getattr(init, "_deepserve_shared", False):
        return
    probe = tensor(None, core.block_type(core.float32, [2, 4]))
    if set(vars(probe)) != {"handle", "shape", "numel", "type", "dtype"}:
        return   # another Triton's tensor: left as it is
    shapes: dict = {}

    def shared_init(self, handle, type):
        self.handle, self.type, self.dtype = handle, type, type.scalar
        dims = type.shape if type.is_block() else ()
        key = tuple(dims.values if isinstance(dims, core.tuple) else dims)
        made = shapes.get(key)
        if made is None:
            made = shapes[key] = (core.constexpr(math.prod(key)), core.tuple([core.constexpr(d) for d in key]))
        self.numel, self.shape = made

    shared_init._deepserve_shared = True
    tensor.__init__ = shared_init
