"""The bytes one execution of a compiled XLA program moves, from its optimized HLO text (`compiled.as_text()`).

A decode step is memory-bound: its time follows the bytes it reads and writes, and Q-Sparse's sparse decode saves
exactly those (it reads the kept rows of each W). XLA's own `cost_analysis()` does not say so: it counts a while
loop's body once whatever its trip count (the blocks run under one scan, the CPU/GPU sparse matvec is a scan over
chunks of kept rows), it counts a fused dynamic-slice's whole operand, and for a deviceless GPU compile it is None.
So this module reads the program itself:

- every instruction moves the bytes of its operands plus its result, with these exceptions:
- parameter, constant, tuple, get-tuple-element, bitcast, opt-barrier, after-all and the *-done halves of async
  pairs move nothing (they name buffers, or were counted at their start);
- while: its trip count (backend_config "known_trip_count", which XLA writes on CPU, GPU and TPU) times its body,
  plus the condition once per trip and once more; a loop without a known trip count (a data-dependent one) counts
  what the caller's `trips_of` says, else once (`Traffic.untripped` says how many did);
- conditional: its largest branch (an upper bound: which branch runs is known only at run time);
- call, async-start (and the *-start of async collectives' wrapped computations): the callee;
- fusion: its output plus, per fusion parameter, the bytes actually read: when every use of the parameter inside the
  fused computation (looking through bitcasts and reshapes) is the sliced operand of a dynamic-slice, slice or gather,
  the sum of those results, else the whole parameter. A fused dynamic-update-slice into a parameter (in place, as
  XLA runs it) writes only its update, and reads nothing of the buffer it updates;
- dynamic-update-slice: the update read and written (in place); dynamic-slice, slice, gather unfused: their result
  read and written (plus the index operands);
- custom-call (a Mosaic kernel, cuBLAS): operands plus result, less a trailing u8/s8 scratch buffer of a tuple result
  (the workspace XLA's GPU library calls take). For a kernel that reads only some rows of an operand (the Mosaic
  sparse matvec) this is an overestimate: HLO does not say which rows a kernel reads.

Entry parameters (weights, cache) are not counted by themselves: the instructions that read them are. Pure text
processing, no jax.
"""

from __future__ import annotations

import dataclasses
import re
import typing

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
               "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3": 1, "f8e3m4": 1, "token": 0}
FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "opt-barrier", "after-all", "domain",
        "add-dependency", "partition-id", "replica-id"}
SLICING = {"dynamic-slice", "slice", "gather"}  # read only their result's bytes of operand 0
SEE_THROUGH = {"bitcast", "reshape"}  # same elements, another shape: followed when tracing a fusion parameter's uses
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([<=\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLED = re.compile(r"\b(calls|condition|body|to_apply|true_computation|false_computation|branch_computations|"
                     r"called_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'known_trip_count\\?"\s*:\s*\{\s*\\?"n\\?"\s*:\s*\\?"(\d+)')
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_COMMENT = re.compile(r"/\*.*?\*/")  # XLA numbers long operand lists and tuples: /*index=5*/


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  shape: str  # the result's type text: "f32[16,128]{1,0}" or a tuple "(s32[], f32[8]{0})"
  operands: tuple[str, ...]  # operand names (for a parameter: its number)
  called: dict  # attribute ("calls", "body", ...) -> tuple of computation names
  trip_count: int | None = None  # a while loop's known_trip_count

  @property
  def bytes(self) -> int:
    return shape_bytes(self.shape)


@dataclasses.dataclass(frozen=True)
class Computation:
  name: str
  instructions: dict  # name -> Instruction, in program order
  root: str


class Traffic(typing.NamedTuple):
  bytes: int  # read + written by one execution of the entry computation
  untripped: int  # while loops without a known trip count, counted once each


def shape_bytes(shape: str) -> int:
  """Bytes of every array in a type text ("bf16[2,3]{1,0}" is 12; a tuple sums its elements; "<=8" counts 8)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(_STRING.sub("", shape)):
    count = 1
    for dim in filter(None, dims.split(",")):
      count *= int(dim.removeprefix("<="))
    total += DTYPE_BYTES.get(dtype, 0) * count
  return int(total)


def tuple_elements(shape: str) -> list[str]:
  """The top-level element types of a tuple type text (the type itself when it is not a tuple)."""
  shape = _COMMENT.sub("", shape).strip()
  if not shape.startswith("("):
    return [shape]
  return [part.strip() for part in split_top_level(shape[1:-1]) if part.strip()]


def _unquoted(text: str, start: int = 0):
  """(index, char, bracket depth after it) for each char of text from start outside quoted strings."""
  depth, quoted = 0, False
  for i in range(start, len(text)):
    char = text[i]
    if char == '"' and (i == 0 or text[i - 1] != "\\"):
      quoted = not quoted
    elif not quoted:
      depth += (char in "({[") - (char in ")}]")
      yield i, char, depth


def split_top_level(text: str) -> list[str]:
  """text split at the commas outside (), {}, [] and quotes."""
  parts, start = [], 0
  for i, char, depth in _unquoted(text):
    if char == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return parts


def _closing(text: str, start: int) -> int:
  """The index of the bracket closing the one at text[start], skipping quoted strings."""
  for i, char, depth in _unquoted(text, start):
    if char in ")}]" and depth == 0:
      return i
  raise ValueError(f"unbalanced brackets in HLO text: {text[start:start + 200]!r}")


def parse_instruction(line: str) -> tuple[Instruction, bool] | None:
  """(the instruction of one HLO text line, whether it is its computation's ROOT), or None for another line."""
  found = _INSTRUCTION.match(_COMMENT.sub("", line))
  if not found:
    return None
  is_root, name, rest = bool(found.group(1)), found.group(2), found.group(3).strip()
  end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
  shape, rest = rest[:end], rest[end:].strip()
  opcode = re.match(r"[\w\-]+", rest).group(0)
  open_at = len(opcode)
  close_at = _closing(rest, open_at)
  operand_text, attrs = rest[open_at + 1:close_at], rest[close_at + 1:]
  if opcode == "parameter":
    operands = (operand_text.strip(),)
  elif opcode == "constant":
    operands = ()
  else:
    operands = tuple(part.split()[-1].lstrip("%") for part in split_top_level(operand_text) if part.strip())
  plain = _STRING.sub('""', attrs)
  called = {key: tuple(n.strip().lstrip("%") for n in value.strip("{}").split(",") if n.strip())
            for key, value in _CALLED.findall(plain)}
  trip = _TRIP.search(attrs) if opcode == "while" else None
  return Instruction(name, opcode, shape, operands, called, int(trip.group(1)) if trip else None), is_root


def parse_module(text: str) -> tuple[dict, str]:
  """({computation name: Computation}, the entry computation's name) of an HLO module's text."""
  computations, entry, current, body, root = {}, None, None, {}, None
  for line in text.splitlines():
    header = _HEADER.match(line) if current is None else None
    if header:
      current, body, root = header.group(2), {}, None
      entry = current if header.group(1) else entry
      continue
    if current is None:
      continue
    if line.strip() == "}":
      computations[current] = Computation(current, body, root or next(reversed(body)))
      current = None
      continue
    parsed = parse_instruction(line)
    if parsed:
      instruction, is_root = parsed
      body[instruction.name] = instruction
      root = instruction.name if is_root else root
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def _users(computation: Computation) -> dict:
  """name -> [(user Instruction, operand index)] within a computation."""
  users = {name: [] for name in computation.instructions}
  for instruction in computation.instructions.values():
    for index, operand in enumerate(instruction.operands):
      if operand in users and instruction.opcode not in ("parameter", "constant"):
        users[operand].append((instruction, index))
  return users


def _uses(name: str, users: dict) -> list:
  """The uses of an instruction, looking through SEE_THROUGH ones: [(user, operand index)]."""
  found = []
  for user, index in users[name]:
    found += _uses(user.name, users) if user.opcode in SEE_THROUGH else [(user, index)]
  return found


def _source(name: str, computation: Computation) -> Instruction:
  """The instruction a value comes from, looking back through SEE_THROUGH ones."""
  instruction = computation.instructions[name]
  while instruction.opcode in SEE_THROUGH:
    instruction = computation.instructions[instruction.operands[0]]
  return instruction


def _in_place_outputs(fused: Computation) -> dict:
  """{name of a parameter updated in place: update bytes} for the fused root's dynamic-update-slices (the root, or
  the elements of a root tuple) into a parameter."""
  root = fused.instructions[fused.root]
  outputs = [fused.instructions[o] for o in root.operands] if root.opcode == "tuple" else [root]
  found = {}
  for output in outputs:
    output = _source(output.name, fused)
    if output.opcode == "dynamic-update-slice":
      buffer = _source(output.operands[0], fused)
      if buffer.opcode == "parameter":
        found[buffer.name] = found.get(buffer.name, 0) + fused.instructions[output.operands[1]].bytes
  return found


def fusion_bytes(fusion: Instruction, fused: Computation, operand_bytes: list[int]) -> int:
  """A fusion's output bytes plus the bytes it reads of each operand (module docstring)."""
  in_place = _in_place_outputs(fused)
  root = fused.instructions[fused.root]
  outputs = [fused.instructions[o] for o in root.operands] if root.opcode == "tuple" else [root]
  written = 0
  for output in outputs:
    source = _source(output.name, fused)
    updated = (source.opcode == "dynamic-update-slice"
               and _source(source.operands[0], fused).name in in_place)
    written += fused.instructions[source.operands[1]].bytes if updated else output.bytes
  users = _users(fused)
  read = 0
  for instruction in fused.instructions.values():
    if instruction.opcode != "parameter":
      continue
    whole = operand_bytes[int(instruction.operands[0])]
    uses = _uses(instruction.name, users)
    slices = [user.bytes for user, index in uses if user.opcode in SLICING and index == 0]
    updates = [user for user, index in uses if user.opcode == "dynamic-update-slice" and index == 0
               and instruction.name in in_place]
    if uses and len(slices) + len(updates) == len(uses):
      read += sum(slices)
    else:
      read += whole
  return written + read


def _result_bytes(instruction: Instruction) -> int:
  """A result's bytes, less a custom call's trailing u8/s8 scratch buffer."""
  elements = tuple_elements(instruction.shape)
  if instruction.opcode == "custom-call" and len(elements) > 1 and re.match(r"[us]8\[", elements[-1]):
    elements = elements[:-1]
  return sum(shape_bytes(e) for e in elements)


class _Counter:
  def __init__(self, computations: dict, trips_of):
    self.computations = computations
    self.trips_of = trips_of
    self.untripped = 0
    self.memo = {}

  def computation(self, name: str) -> int:
    if name not in self.memo:
      computation = self.computations[name]
      self.memo[name] = sum(self.instruction(i, computation) for i in computation.instructions.values())
    return self.memo[name]

  def instruction(self, instruction: Instruction, computation: Computation) -> int:
    op = instruction.opcode
    if op in FREE or op.endswith("-done") or op == "async-update":
      return 0
    called = instruction.called
    if op == "while":
      trips = instruction.trip_count
      if trips is None and self.trips_of is not None:
        trips = self.trips_of(instruction)
      if trips is None:
        self.untripped += 1
        trips = 1
      return trips * self.computation(called["body"][0]) + (trips + 1) * self.computation(called["condition"][0])
    if op == "conditional":
      branches = called.get("branch_computations") or called.get("true_computation", ()) + called.get(
          "false_computation", ())
      return max(self.computation(b) for b in branches)
    if op in ("call", "async-start") or (op.endswith("-start") and "calls" in called):
      return sum(self.computation(c) for c in called.get("calls", ()) + called.get("to_apply", ()))
    operand_bytes = [computation.instructions[o].bytes if o in computation.instructions else 0
                     for o in instruction.operands]
    if op == "fusion":
      return fusion_bytes(instruction, self.computations[called["calls"][0]], operand_bytes)
    if op == "dynamic-update-slice":
      return 2 * operand_bytes[1]
    if op in SLICING:
      return 2 * instruction.bytes + sum(operand_bytes[1:])
    return sum(operand_bytes) + _result_bytes(instruction)


def traffic(hlo_text: str, trips_of=None) -> Traffic:
  """The bytes one execution of the module's entry computation reads and writes (module docstring).

  trips_of: None, or a function of a while Instruction without a known trip count that returns the trips to count
  for it (what the caller knows of the program: a loop over a KV cache's blocks), or None to count it once."""
  computations, entry = parse_module(hlo_text)
  counter = _Counter(computations, trips_of)
  return Traffic(counter.computation(entry), counter.untripped)
