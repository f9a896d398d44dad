"""Keep a seeded random sample of a cosmic-ray session's pending mutants; mark the rest skipped.

Usage: python .mutation/sample.py SESSION.sqlite N [SEED]. For a module whose full run does not
fit the time at hand: the killed fraction of the sample estimates the module's.
"""

import random
import sqlite3
import sys

db = sqlite3.connect(sys.argv[1])
n, seed = int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0
pending = [
    job
    for (job,) in db.execute(
        "select job_id from mutation_specs where job_id not in (select job_id from work_results) "
        "order by job_id"
    )
]
keep = set(random.Random(seed).sample(pending, min(n, len(pending))))
db.executemany(
    "insert into work_results (job_id, worker_outcome, output, test_outcome, diff) "
    "values (?, 'SKIPPED', 'not in the sample', NULL, NULL)",
    [(job,) for job in pending if job not in keep],
)
db.commit()
print(f"kept {len(keep)} of {len(pending)} pending mutants (seed {seed})")
