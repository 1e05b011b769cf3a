# The guest's deterministic block contents; test/helpers/guest.ts builds the same bytes.
#
# A block of `bs` bytes is bs/64 lines of exactly 64 bytes, each naming what the block is:
#     VMSHIFT-<tag> <a:%010d> <b:%010d> <line:%03d> <25 x '-'>\n
#   pattern block i:   tag PAT, a = i (absolute disk block), b = seed
#   writer record k:   tag SEQ, a = k,                       b = slot = k mod slots
# Every 64-byte line carries the identity, so a stale, misplaced or torn sector shows up.
#
# Generate:  awk -f blocks.awk -v tag=PAT -v a=FIRST -v n=COUNT -v b=SEED -v bs=4096
#            awk -f blocks.awk -v tag=SEQ -v a=FIRST -v n=COUNT -v slots=SLOTS -v bs=4096
#            (n blocks with a counting up from FIRST; n=0 means without end)
# Check:     ... | awk -f blocks.awk -v check=1 -v tag=PAT -v a=FIRST -v n=COUNT -v b=SEED -v bs=4096
#            reads the blocks on stdin and prints VMSHIFT-VERIFY-OK or VMSHIFT-VERIFY-BAD <block>.

function line(blk, j) {
  return sprintf("VMSHIFT-%s %010d %010d %03d %s", tag, blk, b, j, "-------------------------")
}

BEGIN {
  if (bs == "") bs = 4096
  lpb = int(bs / 64)
  if (lpb < 1 || lpb * 64 != bs || lpb > 999) { print "VMSHIFT-ERROR bs must be a multiple of 64 up to 63936" > "/dev/stderr"; exit 2 }
  if (!check) {
    for (i = 0; n == 0 || i < n; i++) {
      if (slots) b = (a + i) % slots
      for (j = 0; j < lpb; j++) printf "%s\n", line(a + i, j)
    }
    exit 0
  }
}

# Check mode: compare line by line; the first differing line names the bad block.
check {
  blk = int((NR - 1) / lpb)
  if (blk >= n) exit 0
  if ($0 != line(a + blk, (NR - 1) % lpb)) { bad = a + blk; exit 0 }
}

END {
  if (!check) exit 0
  if (bad == "" && NR < n * lpb) bad = a + int(NR / lpb)
  if (bad != "") print "VMSHIFT-VERIFY-BAD " bad
  else print "VMSHIFT-VERIFY-OK"
}
