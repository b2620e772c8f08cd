# cmake -DPATHS=a|b|... -P check_absent.cmake: fails when any of the paths exists (a refused command wrote it).
string(REPLACE "|" ";" paths "${PATHS}")
foreach(path IN LISTS paths)
  if(EXISTS "${path}")
    message(FATAL_ERROR "${path} exists: a refused command must write nothing")
  endif()
endforeach()
message(STATUS "none of ${PATHS} exists")
