"""benchmarks/sass_mla_decode_fp8.py's reading of nvdisasm output: the loop is the instructions
from a label to the last branch back to it, counted by opcode (and LDS by width)."""
from __future__ import annotations

from tests.bench.conftest import benchmark_module

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDS.U8 R2, [R3] ;
        /*0020*/                   LDS.U8 R4, [R3+0x240] ;
        /*0030*/                   F2FP.F16.E4M3.UNPACK_B R5, R2 ;
        /*0040*/              @P0  LDGSTS.E.BYPASS.128 [R6], desc[UR4][R8.64] ;
.L_x_2:
        /*0050*/                   HGMMA.64x16x16.F32 R24, gdesc[UR8], R24 ;
        /*0060*/              @!P1 BRA `(.L_x_2) ;
        /*0070*/              @P2  BRA `(.L_x_1) ;
        /*0080*/                   LDS.128 R8, [R9] ;
        /*0090*/                   EXIT ;
"""


def test_loop_body_and_counts():
    sass = benchmark_module("sass_mla_decode_fp8")
    loop = sass.loop_body(SASS)
    assert len(loop) == 7 and "LDS.U8" in loop[0] and "BRA" in loop[-1]
    ops = sass.counts(loop)
    assert (ops["LDS"], ops["LDS.U8"], ops["LDS.128"], ops["LDGSTS"], ops["HGMMA"], ops["BRA"]) == (2, 2, 0, 1, 1, 2)
    assert sass.loop_body("        /*0000*/    EXIT ;\n") == []
