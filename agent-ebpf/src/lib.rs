#![no_std]
// The programs live in the `breakwater` binary target of this crate; this empty library only lets
// the agent's build script depend on the crate so that edits here rebuild the agent.
