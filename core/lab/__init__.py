"""The lab: offline tools that make and audit the bundled weights, apart from the runtime.

Data folders, near-duplicate groups and group-aware splits (`data`), training (`train`), scoring
(`evaluate`), the card appraisal (`appraisal`), the shortcut and framing audits (`shortcuts`,
`framing`), cross-validation (`crossval`), the wrong-input guard's fitting (`guard_fit`) and the data
audit command (`audit`). The runtime (everything that answers an upload) never imports this package.
"""
