"""CyxWiz's common library: settings, Redis keys, Lua scripts, schemas, state transitions, auth, errors."""
