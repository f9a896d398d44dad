"""Print each surviving mutant of a cosmic-ray session (line, operator, the changed lines).

A session of several modules names the module before each line.
"""

import sqlite3
import sys

db = sqlite3.connect(sys.argv[1])
rows = db.execute(
    "select s.module_path, s.start_pos_row, s.operator_name, r.diff from work_results r "
    "join mutation_specs s using (job_id) where r.test_outcome = 'SURVIVED' "
    "order by s.module_path, s.start_pos_row"
)
several = db.execute("select count(distinct module_path) from mutation_specs").fetchone()[0] > 1
for module, line, op, diff in rows:
    changed = [d for d in diff.splitlines() if d[:1] in "+-" and d[:3] not in ("+++", "---")]
    where = f"{module} line {line}" if several else f"line {line}"
    print(f"{where}: {op.removeprefix('core/')}: {' | '.join(changed)}")
counts = dict(db.execute("select test_outcome, count(*) from work_results group by test_outcome"))
total = db.execute("select count(*) from mutation_specs").fetchone()[0]
killed, survived = counts.get("KILLED", 0), counts.get("SURVIVED", 0)
done = killed + survived + counts.get("INCOMPETENT", 0)
print(
    f"killed {killed}, survived {survived}, incompetent {counts.get('INCOMPETENT', 0)}, "
    f"skipped {counts.get(None, 0)}, pending {total - done - counts.get(None, 0)} of {total}; "
    f"killed fraction {killed / max(killed + survived, 1):.3f}"
)
