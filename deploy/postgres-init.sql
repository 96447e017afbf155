-- Each mlmesh service owns its database; the registry uses `mlmesh` (POSTGRES_DB).
CREATE DATABASE mlmesh_deployer;
CREATE DATABASE mlmesh_builder;
CREATE DATABASE mlmesh_collector;
CREATE DATABASE mlmesh_drift;
CREATE DATABASE mlmesh_profiler;
CREATE DATABASE mlmesh_notifier;
CREATE DATABASE mlmesh_automation;
